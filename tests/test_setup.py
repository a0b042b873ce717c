"""The package's declared dependency bounds cover the APIs the code uses."""
import configparser
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = {
    "torch": (2, 4),         # fused AdamW on CPU (train.py)
    "pillow": (10, 1),       # Image.has_transparency_data (data.py)
    "safetensors": (0, 4),   # sample.py --export and loading the exported file
}


def lower_bounds():
    """{package: (major, minor)} from setup.cfg's install_requires lines 'name>=X.Y'."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    bounds = {}
    for line in cfg["options"]["install_requires"].split():
        name, _, version = line.partition(">=")
        bounds[name.lower()] = tuple(int(v) for v in (version.split(".") + ["0"])[:2])
    return bounds


def test_lower_bounds_cover_the_apis_used():
    bounds = lower_bounds()
    for package, needed in NEEDED.items():
        assert bounds.get(package, (0, 0)) >= needed, (package, bounds.get(package), needed)
