from e2b import Sandbox


def test_health_and_sdk_connects(sandbox: Sandbox) -> None:
    assert sandbox.is_running()
