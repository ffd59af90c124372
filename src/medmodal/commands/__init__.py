"""Sub-commands of ``medmodal`` that live next to the method they drive; ``cli.py`` wires them in."""
