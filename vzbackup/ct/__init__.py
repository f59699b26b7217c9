"""Container runtime: lifecycle, namespaces, cgroups, network, templates."""
