"""Several devices and hosts: the mesh and its one logical-axis rules table, multi-host start-up."""
