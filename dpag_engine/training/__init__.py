"""Training a DP-AG or Diffusion Policy: one job per module (see README.md); the command line is
`python -m dpag_engine.train` (training.cli)."""
