"""The Hub workflow against a fake Hub on 127.0.0.1: a training run pushes its final folder with --push-to-hub, the
one-liner pushes an existing folder, and a fresh process that cannot import hier_transformers loads the model by
repo id (trust_remote_code) and generates the same tokens as the local checkpoint."""

import subprocess
import sys

import torch
import yaml
from conftest import last_json_line, run_without_package
from fake_hub import FakeHub
from training_utils import REPO_ROOT, TINY_CLM_RUN, child_env, run_script

PROMPT = "The minister"


def test_push_to_fake_hub_and_load_by_repo_id(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with FakeHub() as hub:
        hub_env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "fake-token",
                   "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
        run_script("pretrain_clm.py", {**TINY_CLM_RUN, "max_steps": 4, "eval_every": 4, "save_every": 4,
                                       "output_dir": tmp_path / "run", "push_to_hub": "user/tiny-xl"},
                   env=child_env(**hub_env))
        final = tmp_path / "run" / "final"
        pushed = subprocess.run([sys.executable, "-m", "training.push_to_hub", str(final), "org/tiny-xl-copy"],
                                cwd=REPO_ROOT, env=child_env(**hub_env), capture_output=True, text=True, timeout=120)
        assert pushed.returncode == 0, pushed.stderr[-3000:]

        files = hub.files("user/tiny-xl")
        local = {path.name for path in final.iterdir()}
        assert local <= set(files)
        assert files["model.safetensors"] == (final / "model.safetensors").read_bytes()
        assert set(hub.files("org/tiny-xl-copy")) == set(files)
        metadata = yaml.safe_load(files["README.md"].decode().split("---")[1])
        assert metadata["pipeline_tag"] == "text-generation" and metadata["model-index"][0]["results"]

        stdout = run_without_package(
            f"""
            import json
            from transformers import AutoModelForCausalLM, AutoTokenizer
            model = AutoModelForCausalLM.from_pretrained("user/tiny-xl", trust_remote_code=True).eval()
            tokenizer = AutoTokenizer.from_pretrained("user/tiny-xl", trust_remote_code=True)
            ids = tokenizer({PROMPT!r}, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(ids, max_new_tokens=24, do_sample=False)
            print(json.dumps({{"ids": out[0].tolist(), "module": type(model).__module__}}))
            """,
            cwd=str(tmp_path), env=hub_env, timeout=300,
        )
        requests = list(hub.requests)
    loaded = last_json_line(stdout)
    assert loaded["module"].startswith("transformers_modules")  # the code came from the repo, not the package
    assert ("POST", "/api/models/user/tiny-xl/commit/main") in requests
    assert any(method == "GET" and path.startswith("/user/tiny-xl/resolve/") for method, path in requests)

    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=True)
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist()
    assert loaded["ids"] == expected
