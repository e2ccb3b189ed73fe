"""Storage of the control plane: SQLAlchemy (async) over SQLite or PostgreSQL, Alembic
migrations shipped in ``migrations/``. Everything outside this package sees ``Database``,
``Transaction`` and the records of ``records``."""

from wrenn.controlplane.db.database import Database, Transaction

__all__ = ["Database", "Transaction"]
