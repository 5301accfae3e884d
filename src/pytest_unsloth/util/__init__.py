"""Small helpers shared by the plugin's packages: standard library only, cheap to import."""
