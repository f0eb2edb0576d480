"""Generated gRPC code: run `make proto`, never edit."""
