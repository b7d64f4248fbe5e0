"""quantkit.hub through the real huggingface_hub client, against the stand-in Hub of tests/hub_server.py."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from safetensors.torch import load_file, save_file

from quantkit.errors import ExportError, HubError
from quantkit.hub import PushResult, RetryPolicy, check_complete_output, push_folder
from quantkit.hub_cli import add_push_command
from tests.hub_server import HubStandIn

TOKEN = "hf_QkFakeWriteToken_5e1d7c93b2"  # recognisable, so a leak anywhere is found by a substring search
READ_TOKEN = "hf_QkFakeReadToken_0a8f4e61d9"
BAD_TOKEN = "hf_QkFakeRevokedToken_77c0b1e4aa"
USER = "alice"
BIG = 10 * 1024 * 1024 + 4096  # over 10 MB: the client's large-file (LFS) path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_DISABLE_XET once, at import; set the constant it was read into, and the
    # variable for anything started from here. This is the client's own switch, not a patch of its code.
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server = HubStandIn(tmp_path / "hub", {TOKEN: (USER, "write"), READ_TOKEN: (USER, "read")}).start()
    yield server
    server.stop()


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps():
    return Sleeps()


def make_output(
    folder: Path, *, sharded: bool, seed: int = 0, card: str = "int4 weights"
) -> dict[str, torch.Tensor]:
    """A complete quantkit output folder: config with quantization_config, weights, tokenizer, card."""
    g = torch.Generator().manual_seed(seed)
    small = {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=g, dtype=torch.float32).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight_packed": torch.randint(
            -(2**31), 2**31 - 1, (32, 4), generator=g, dtype=torch.int32
        ),
        "model.layers.0.self_attn.q_proj.weight_scale": torch.rand(32, 1, generator=g).to(torch.float16),
    }
    big = {"lm_head.weight": torch.randn(BIG // 4, generator=g)}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"},
            }
        )
    )
    (folder / "tokenizer.json").write_text(
        json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}})
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (folder / "README.md").write_text(
        f"---\nlicense: apache-2.0\ntags: [quantkit]\n---\n# Tiny model\n\n{card}\n"
    )
    tensors = {**small, **big}
    if sharded:
        names = {"model-00001-of-00002.safetensors": small, "model-00002-of-00002.safetensors": big}
        for name, part in names.items():
            save_file(part, str(folder / name))
        weight_map = {k: name for name, part in names.items() for k in part}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    else:
        save_file(tensors, str(folder / "model.safetensors"))
    return tensors


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in weight_files(folder):
        out.update(load_file(str(f)))
    return out


def api(hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def push(hub, folder, repo_id=f"{USER}/tiny-int4", **kw) -> PushResult:
    kw.setdefault("token", TOKEN)
    kw.setdefault("retry", RetryPolicy(sleep=Sleeps()))
    return push_folder(folder, repo_id, endpoint=hub.endpoint, **kw)


# ---------------------------------------------------------------------------- the happy path


def test_push_round_trips_through_the_real_client(hub, tmp_path):
    out = tmp_path / "out"
    tensors = make_output(out, sharded=True)
    result = push(hub, out, commit_message="int4 of tiny")

    assert result.changed and result.revision == "main"
    assert set(result.files) == {p.name for p in out.iterdir()}
    big_oid = hashlib.sha256((out / "model-00002-of-00002.safetensors").read_bytes()).hexdigest()
    seen = hub.state.requests
    # The 10 MB shard took the client's LFS path: preupload -> batch -> PUT -> verify -> commit.
    order = [
        ("POST", f"/api/models/{USER}/tiny-int4/preupload/main"),
        ("POST", f"/{USER}/tiny-int4.git/info/lfs/objects/batch"),
        ("PUT", f"/_lfs/upload/{big_oid}"),
        ("POST", f"/_lfs/verify/{big_oid}"),
        ("POST", f"/api/models/{USER}/tiny-int4/commit/main"),
    ]
    assert [seen.index(r) for r in order] == sorted(seen.index(r) for r in order)
    assert not any("xet" in path for _, path in seen)

    tree = {f.path: f for f in api(hub).list_repo_tree(f"{USER}/tiny-int4", recursive=True, expand=True)}
    assert tree["model-00002-of-00002.safetensors"].lfs.sha256 == big_oid
    assert (
        tree["model-00002-of-00002.safetensors"].size
        == (out / "model-00002-of-00002.safetensors").stat().st_size
    )
    commits = api(hub).list_repo_commits(f"{USER}/tiny-int4")
    assert commits[0].title == "int4 of tiny" and commits[0].commit_id == result.commit_oid

    down = Path(
        snapshot_download(
            f"{USER}/tiny-int4", endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "cache"
        )
    )
    local = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {p.relative_to(down).as_posix() for p in down.rglob("*") if p.is_file()} == local | {
        ".gitattributes"
    }
    for name in local:
        assert (down / name).read_bytes() == (out / name).read_bytes(), name
    one = hf_hub_download(
        f"{USER}/tiny-int4",
        "model-00002-of-00002.safetensors",
        endpoint=hub.endpoint,
        token=TOKEN,
        cache_dir=tmp_path / "c2",
    )
    assert Path(one).read_bytes() == (out / "model-00002-of-00002.safetensors").read_bytes()

    # Loadable by quantkit: a complete output, weights equal to what was written.
    check_complete_output(down)
    loaded = load_all(down)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t), k


def test_second_push_is_exactly_one_commit_and_drops_stale_weights(hub, tmp_path):
    repo = f"{USER}/tiny-int4"
    make_output(tmp_path / "v1", sharded=True)
    first = push(hub, tmp_path / "v1")
    before = len(api(hub).list_repo_commits(repo))

    tensors = make_output(tmp_path / "v2", sharded=False, seed=1, card="re-quantized")
    second = push(hub, tmp_path / "v2", commit_message="v2")
    assert second.changed and second.commit_oid != first.commit_oid
    assert len(api(hub).list_repo_commits(repo)) == before + 1 == hub.state.commit_count(repo)
    # The old shards and index went in that same commit: they would otherwise shadow the new file.
    assert sorted(api(hub).list_repo_files(repo)) == sorted([".gitattributes", *second.files])
    down = Path(snapshot_download(repo, endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "cache"))
    check_complete_output(down)
    assert all(torch.equal(load_all(down)[k], t) for k, t in tensors.items())

    again = push(hub, tmp_path / "v2")
    assert not again.changed and again.commit_oid == second.commit_oid
    assert len(api(hub).list_repo_commits(repo)) == before + 1


def test_push_to_a_branch_leaves_main_alone(hub, tmp_path):
    repo = f"{USER}/tiny-int4"
    make_output(tmp_path / "v1", sharded=False)
    main = push(hub, tmp_path / "v1")
    make_output(tmp_path / "v2", sharded=False, seed=2)
    branch = push(hub, tmp_path / "v2", revision="w4a16-g64")
    assert branch.revision == "w4a16-g64" and branch.changed
    assert api(hub).repo_info(repo, revision="main").sha == main.commit_oid
    path = hf_hub_download(
        repo,
        "model.safetensors",
        revision="w4a16-g64",
        endpoint=hub.endpoint,
        token=TOKEN,
        cache_dir=tmp_path / "c",
    )
    assert Path(path).read_bytes() == (tmp_path / "v2" / "model.safetensors").read_bytes()


def test_private_push_and_refusal_to_publish_into_a_public_repo(hub, tmp_path):
    make_output(tmp_path / "out", sharded=False)
    push(hub, tmp_path / "out", repo_id=f"{USER}/secret", private=True)
    assert api(hub).repo_info(f"{USER}/secret").private
    push(hub, tmp_path / "out", repo_id=f"{USER}/public")
    with pytest.raises(HubError) as exc:
        push(hub, tmp_path / "out", repo_id=f"{USER}/public", private=True)
    assert (exc.value.field, exc.value.value) == ("push.private", True)
    assert exc.value.hint == f"make it private on {hub.endpoint}/{USER}/public/settings or push to another repo_id"


def test_token_and_endpoint_come_from_the_environment(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    make_output(tmp_path / "out", sharded=False)
    result = push_folder(tmp_path / "out", f"{USER}/from-env", retry=RetryPolicy(sleep=Sleeps()))
    assert result.changed


# ---------------------------------------------------------------------------- refusals before any request


def test_no_token_anywhere_is_refused_before_any_request(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-login"))
    make_output(tmp_path / "out", sharded=False)
    with pytest.raises(HubError) as exc:
        push_folder(tmp_path / "out", f"{USER}/x", endpoint=hub.endpoint)
    assert exc.value.field == "HF_TOKEN" and exc.value.hint == "set HF_TOKEN or run `hf auth login`, then push again"
    assert hub.state.requests == []


def _cut(path, drop, keep=None):
    """What an interrupted copy leaves: the file's first bytes only."""
    raw = path.read_bytes()
    path.write_bytes(raw[:keep if keep is not None else len(raw) - drop])


def _misplace_tensor(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def test_invalid_repo_id_is_refused_before_any_request(hub, tmp_path):
    out = tmp_path / "out"
    make_output(out, sharded=False)
    with pytest.raises(HubError) as e:
        push(hub, out, repo_id="alice/tiny int4")
    assert e.value.message.startswith("'alice/tiny int4' is not a valid Hub repo id (")
    assert hub.state.requests == []


def _drop_quant_config(out):
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))


@pytest.mark.parametrize(
    ("breakage", "file", "named"),
    [
        (_drop_quant_config, "config.json", "quantization_config"),
        (lambda out: (out / "model-00001-of-00002.safetensors").unlink(), "model.safetensors.index.json",
         "model-00001-of-00002.safetensors"),
        (lambda out: [p.unlink() for p in out.glob("model*")], "", "neither model.safetensors"),
        (lambda out: [(out / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "", "tokenizer"),
        (lambda out: (out / "README.md").unlink(), "", "README.md"),
        (lambda out: (out / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
        (lambda out: _cut(out / "model-00002-of-00002.safetensors", 4096), "model-00002-of-00002.safetensors",
         r"model-00002-of-00002.safetensors: tensor lm_head.weight: ends at byte \d+ of data but the file holds \d+ "
         r"\(the file is truncated\)"),
        (lambda out: _cut(out / "model-00001-of-00002.safetensors", 10**9, keep=20), "model-00001-of-00002.safetensors",
         r"model-00001-of-00002.safetensors: header length \d+ exceeds the file's 20 bytes"),
        (_misplace_tensor, "model.safetensors.index.json",
         "lists tensor lm_head.weight in model-00001-of-00002.safetensors, which does not hold it"),
    ],
)
def test_incomplete_output_is_refused_before_any_request(hub, tmp_path, breakage, file, named):
    out = tmp_path / "out"
    make_output(out, sharded=True)
    breakage(out)
    with pytest.raises(ExportError) as exc:
        push(hub, out)
    assert exc.value.file == str(out / file).rstrip("/") and exc.value.hint == (
        "re-run the quantization into a fresh output_dir")
    assert re.search(named, exc.value.message)  # says what is missing
    assert hub.state.requests == []


# ---------------------------------------------------------------------------- failures: one clear line


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_rejected_token_is_one_line(hub, tmp_path, sleeps):
    make_output(tmp_path / "out", sharded=False)
    with pytest.raises(HubError) as exc:
        push(hub, tmp_path / "out", token=BAD_TOKEN, retry=RetryPolicy(sleep=sleeps))
    assert (exc.value.field, exc.value.value) == ("HF_TOKEN", 401) and "HF_TOKEN" in _one_line(exc)
    assert sleeps == [] and hub.state.requests == [("GET", "/api/whoami-v2")]


@pytest.mark.parametrize(("token", "repo_id"), [(TOKEN, "bob/not-yours"), (READ_TOKEN, f"{USER}/tiny-int4")])
def test_missing_write_permission_is_one_line(hub, tmp_path, token, repo_id):
    make_output(tmp_path / "out", sharded=False)
    with pytest.raises(HubError) as exc:
        push(hub, tmp_path / "out", repo_id=repo_id, token=token)
    assert (exc.value.field, exc.value.value) == ("push.repo_id", repo_id) and "403" in _one_line(exc)
    assert not any(method == "PUT" or "/commit/" in path for method, path in hub.state.requests)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_one_line_without_retrying(hub, tmp_path, sleeps):
    make_output(tmp_path / "out", sharded=False)
    endpoint = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(HubError) as exc:
        push_folder(
            tmp_path / "out", f"{USER}/x", token=TOKEN, endpoint=endpoint, retry=RetryPolicy(sleep=sleeps)
        )
    assert (exc.value.field, exc.value.value) == ("HF_ENDPOINT", endpoint) and "HF_ENDPOINT" in _one_line(exc)
    assert sleeps == []


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [(404, b"Not Found", "text/plain"), (200, b"<html><body>welcome</body></html>", "text/html")],
)
def test_endpoint_that_is_not_a_hub_is_one_line(tmp_path, sleeps, status, body, content_type):
    class NotAHub(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotAHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        make_output(tmp_path / "out", sharded=False)
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(HubError) as exc:
            push_folder(
                tmp_path / "out", f"{USER}/x", token=TOKEN, endpoint=endpoint, retry=RetryPolicy(sleep=sleeps)
            )
        assert (exc.value.field, exc.value.value) == ("HF_ENDPOINT", endpoint)
        assert exc.value.hint == "check HF_ENDPOINT or the endpoint setting" and _one_line(exc)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_xet_refused_by_the_hub_names_the_switch(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", False)
    make_output(tmp_path / "out", sharded=False)
    with pytest.raises(HubError) as exc:
        push(hub, tmp_path / "out")
    assert exc.value.field == "HF_HUB_DISABLE_XET" and "HF_HUB_DISABLE_XET=1" in _one_line(exc)


# ---------------------------------------------------------------------------- retries


def test_transient_failures_are_retried_with_backoff(hub, tmp_path, sleeps):
    repo = f"{USER}/tiny-int4"
    make_output(tmp_path / "out", sharded=True)
    hub.fail("POST", r"^/api/repos/create$", 429)
    hub.fail("POST", r"/commit/main$", 503, times=2)
    hub.fail("GET", r"/revision/main$", 502)
    result = push(hub, tmp_path / "out", retry=RetryPolicy(sleep=sleeps, base_delay=1.5))
    assert sleeps == [1.5, 1.5, 1.5, 3.0]  # per step: create (1), read (1), upload (2, doubling)
    assert result.changed and hub.state.commit_count(repo) == 2  # initial commit + exactly one push
    assert len([r for r in hub.state.requests if r[1].endswith("/commit/main")]) == 3


def test_persistent_failure_gives_up_after_bounded_attempts(hub, tmp_path, sleeps):
    make_output(tmp_path / "out", sharded=False)
    hub.fail("POST", r"/commit/main$", 500, times=100)
    with pytest.raises(HubError) as exc:
        push(
            hub, tmp_path / "out", retry=RetryPolicy(max_attempts=4, sleep=sleeps, base_delay=2, max_delay=5)
        )
    assert exc.value.value == 500 and "4 attempts" in _one_line(exc)
    assert sleeps == [2, 4, 5]


# ---------------------------------------------------------------------------- verification


@pytest.mark.parametrize("path", ["README.md", "model-00002-of-00002.safetensors"])
def test_remote_content_that_differs_is_named(hub, tmp_path, path):
    make_output(tmp_path / "out", sharded=True)
    hub.state.corrupt.add(path)
    with pytest.raises(HubError) as exc:
        push(hub, tmp_path / "out")
    assert exc.value.file == path and exc.value.hint == "push again"
    assert ("sha256" if path.endswith(".safetensors") else "git blob") in _one_line(exc)


# ---------------------------------------------------------------------------- the token stays secret


def test_token_never_appears_in_logs_errors_or_files(hub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    hf_logger = logging.getLogger("huggingface_hub")  # does not propagate to the root logger
    hf_logger.addHandler(caplog.handler)
    texts = []
    try:
        out = tmp_path / "out"
        make_output(out, sharded=True)
        push(hub, out)
        for token, repo in [(BAD_TOKEN, f"{USER}/x"), (READ_TOKEN, f"{USER}/x"), (TOKEN, "bob/x")]:
            with pytest.raises(HubError) as exc:
                push(hub, out, repo_id=repo, token=token)
            texts += [str(exc.value), repr(exc.value), str(exc.value.__cause__)]
        hub.fail("POST", r"/commit/main$", 503, times=100)
        (out / "README.md").write_text("---\nlicense: apache-2.0\n---\nchanged\n")
        with pytest.raises(HubError) as exc:
            push(hub, out, retry=RetryPolicy(max_attempts=2, sleep=Sleeps()))
        texts.append(str(exc.value))
    finally:
        hf_logger.removeHandler(caplog.handler)
    down = Path(
        snapshot_download(f"{USER}/tiny-int4", endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "c")
    )
    texts += [p.read_bytes().decode("latin-1") for p in down.rglob("*") if p.is_file()]
    assert caplog.records, "nothing was logged: the check below would prove nothing"
    for secret in (TOKEN, READ_TOKEN, BAD_TOKEN):
        assert secret not in caplog.text
        assert all(secret not in t for t in texts)


# ---------------------------------------------------------------------------- CLI


def _cli(argv):
    parser = argparse.ArgumentParser(prog="quantkit")
    add_push_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_push_prints_one_line_per_outcome(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    out = tmp_path / "out"
    make_output(out, sharded=False)
    assert _cli(["push", str(out), f"{USER}/cli", "--private", "--message", "from the CLI"]) == 0
    first = capsys.readouterr()
    assert first.out.startswith(f"pushed 5 files to {USER}/cli@main") and first.out.count("\n") == 1
    assert api(hub).repo_info(f"{USER}/cli").private
    assert api(hub).list_repo_commits(f"{USER}/cli")[0].title == "from the CLI"

    assert _cli(["push", str(out), f"{USER}/cli"]) == 0
    assert "nothing pushed" in capsys.readouterr().out

    (out / "README.md").unlink()
    with pytest.raises(ExportError) as exc:  # cli.main prints it in one line
        _cli(["push", str(out), f"{USER}/cli", "--revision", "b"])
    assert exc.value.file == str(out) and "README.md" in exc.value.message
    assert capsys.readouterr().out == ""
    assert TOKEN not in first.out
