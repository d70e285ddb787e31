"""Regenerate every benchmark (encoder; generation: decode and training), then refresh the tables in README.md.

    python benchmarks/run_all.py                  # CPU defaults: ~30 min on one thread
    python benchmarks/run_all.py --quick          # smoke run at tiny sizes (writes *_quick files)
    python benchmarks/run_all.py --device cuda    # GPU defaults: bf16, encoder to 128k, generation to 64k
    python benchmarks/run_all.py --readme-only    # only copy results/*_<device>.md into README.md

Any other argument is passed to both benchmark scripts (e.g. `--threads 2`, `--hidden-size 512`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
CUDA_ENCODER_LENGTHS = ["4096", "16384", "65536", "131072"]


def run(script: str, arguments: list[str]) -> None:
    command = [sys.executable, str(HERE / script), *arguments]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def refresh_readme(device: str, suffix: str = "") -> None:
    """Replace each `<!-- results:NAME -->...<!-- /results -->` block of README.md with results/NAME.md."""
    text = README.read_text()
    for name in (f"encoder_{device}{suffix}", f"generation_{device}{suffix}"):
        table = HERE / "results" / f"{name}.md"
        if not table.exists():
            continue
        body = table.read_text().strip()
        body = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", body, flags=re.M)  # demote headings
        body += f"\n\n![{name}](results/{name}.png)"
        pattern = re.compile(rf"<!-- results:{re.escape(name)} -->.*?<!-- /results -->", re.S)
        block = f"<!-- results:{name} -->\n{body}\n<!-- /results -->"
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text)
        else:
            print(f"README.md has no block for {name}; add `<!-- results:{name} --><!-- /results -->`")
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--readme-only", action="store_true")
    args, passthrough = parser.parse_known_args()
    common = ["--device", args.device, *(["--quick"] if args.quick else []), *passthrough]
    if not args.readme_only:
        lengths = ["--lengths", *CUDA_ENCODER_LENGTHS] if args.device == "cuda" and not args.quick else []
        run("bench_encoder.py", [*common, *lengths])
        run("bench_generation.py", common)
    if not args.quick:
        refresh_readme(args.device)


if __name__ == "__main__":
    main()
