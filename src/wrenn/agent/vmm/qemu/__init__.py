"""The QEMU driver: microvm guests under KVM, or TCG where KVM cannot boot them."""

from wrenn.agent.vmm.qemu.accel import AccelProbe, probe_accel
from wrenn.agent.vmm.qemu.args import Accel
from wrenn.agent.vmm.qemu.qmp import QmpClient, QmpError
from wrenn.agent.vmm.qemu.vmm import GuestFailed, QemuVmm

__all__ = ["Accel", "AccelProbe", "GuestFailed", "QemuVmm", "QmpClient", "QmpError", "probe_accel"]
