"""VMM drivers behind one interface (``Vmm``): qemu and firecracker."""
