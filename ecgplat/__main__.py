"""`python -m ecgplat` runs the command line."""

from ecgplat.cli import app

if __name__ == "__main__":
    app(prog_name="ecgplat")
