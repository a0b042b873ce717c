"""A real captioned image set from a package registry: Google's Noto emoji, as a folder train.py reads.

`python prepare_emoji.py data/emoji` fetches the npm package emoji-datasource-google (`npm pack`; or pass --tgz FILE
where npm cannot reach the registry) and writes one 64 px PNG per emoji with its Unicode name as the caption:
data/emoji/<short_name>.png + <short_name>.txt ("red apple", "crossed swords", "japan flag"): 1,906 images, skin-tone
variants and the five tone swatches left out. Noto emoji images are Apache-2.0 licensed.
"""
import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "emoji-datasource-google@16.0.0"  # pinned: the same images and names on every machine
IMAGES = "package/img/google/64/"


def fetch(folder):
    """The package's .tgz, fetched into folder with npm."""
    name = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=folder, check=True, capture_output=True,
                          text=True).stdout.split()[-1]
    return Path(folder) / name


def captioned_emoji(tgz):
    """(short name, caption, PNG bytes) per emoji with a Google image, tone variants and swatches excluded."""
    with tarfile.open(tgz) as tar:
        entries = json.load(tar.extractfile("package/emoji.json"))
        for entry in entries:
            if entry["has_img_google"] and entry["category"] != "Component":
                png = tar.extractfile(IMAGES + entry["image"]).read()
                yield entry["short_name"], entry["name"].lower(), png


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write (created)")
    parser.add_argument("--tgz", help=f"an already downloaded {PACKAGE} package (.tgz) instead of `npm pack`")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        count = 0
        for count, (name, caption, png) in enumerate(captioned_emoji(args.tgz or fetch(tmp)), 1):
            (out / f"{name}.png").write_bytes(png)
            (out / f"{name}.txt").write_text(caption)
    print(f"wrote {count} captioned emoji to {out}/")


if __name__ == "__main__":
    main()
