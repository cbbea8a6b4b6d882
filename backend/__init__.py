"""camlabel's Label Studio side. Imports wsl_models; wsl_models never imports it."""
