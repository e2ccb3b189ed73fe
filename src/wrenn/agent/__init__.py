"""The host agent: one per machine. Builds guest images, boots and snapshots sandboxes,
gives each its own network slot and copy-on-write disk. Imports nothing of the control
plane; inside, imports point downward (server → manager → resources → core)."""
