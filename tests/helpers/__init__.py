"""What the tests share, by concern: `fabricate` (pipeline outputs and params a test makes:
processed data, params.yaml, checkpoints, history), `remote_data` (a loopback HTTP server and each
dataset's archives), `processes` (stages and DVC run as a user runs them, in subprocesses)."""
