"""The bundled digits demo: small models trained on scikit-learn's 8x8 digits, their training script,
and the `fmtt demo` command that runs FMTT against its baselines on a CPU with nothing to download."""
