"""The Firecracker driver: its API client, the ``Vmm`` implementation, jailer support and the
probe the runtime chooser asks."""

from wrenn.agent.vmm.firecracker.api import (
    FirecrackerClient,
    FirecrackerFault,
    InstanceInfo,
    MemoryBackend,
)
from wrenn.agent.vmm.firecracker.jailer import JailerConfig, jailer_argv
from wrenn.agent.vmm.firecracker.probe import FirecrackerProbe, firecracker_usable
from wrenn.agent.vmm.firecracker.vmm import DEFAULT_KERNEL_ARGS, FirecrackerVmm, VmmFailed

__all__ = [
    "DEFAULT_KERNEL_ARGS",
    "FirecrackerClient",
    "FirecrackerFault",
    "FirecrackerProbe",
    "FirecrackerVmm",
    "InstanceInfo",
    "JailerConfig",
    "MemoryBackend",
    "VmmFailed",
    "firecracker_usable",
    "jailer_argv",
]
