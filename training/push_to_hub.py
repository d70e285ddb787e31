"""Push a saved model folder (from any training script here) to the Hugging Face Hub.

    python -m training.push_to_hub runs/xl_news_small/final your-name/hier-xl-news-small [--private]

The folder is uploaded as is (weights, code files for ``trust_remote_code``, tokenizer, generation config and the
generated model card ``README.md``). The endpoint is ``HF_ENDPOINT`` (the public Hub unless set); the token is the
usual one (``hf auth login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False,
                commit_message: str = "Upload hier-transformers model") -> str:
    """Create ``repo_id`` if needed and upload every file of ``folder`` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"folder {folder} holds no config.json: pass a folder written by save_pretrained")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return commit.commit_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by save_pretrained (e.g. runs/<name>/final)")
    parser.add_argument("repo_id", help="the Hub repository, e.g. your-name/hier-xl-news-small")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    args = parser.parse_args(argv)
    print(push_folder(args.folder, args.repo_id, private=args.private))


if __name__ == "__main__":
    main()
