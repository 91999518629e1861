"""Issue #12 item 7: S3 credentials (data.s3.key / secret / token) never reach a written file,
a printed line, a SLURM job's pickle or the config hash."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import torch

from launch.cli import main
from launch.config import ConfigError, config_hash, dump_config, load_config
from tests.pretrain_utils import REPO, pretrain_cmd, run_forked

# AWS's documented example credentials (docs.aws.amazon.com, "Understanding and getting your
# AWS credentials"): shaped like real ones, valid nowhere.
KEY, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN"
CREDS = [f"data.s3.key={KEY}", f"data.s3.secret={SECRET}", f"data.s3.token={TOKEN}"]
# The variables s3fs/botocore read when no credentials are given (botocore's documented
# environment provider): how a job receives them instead.
AWS_ENV = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


def _leaks(*roots: Path) -> list[str]:
    """Every file under ``roots`` whose bytes hold one of the credential values."""
    values = [v.encode() for v in (KEY, SECRET, TOKEN)]
    return [str(p) for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and any(v in p.read_bytes() for v in values)]


def _configs():
    from finetune.classification import ClassificationConfig
    from pretrain.config import PretrainConfig

    return [(PretrainConfig, DEMO), (ClassificationConfig, None)]


@pytest.mark.parametrize("cls, path", _configs())
def test_rotating_credentials_keeps_the_config_hash(cls, path):
    with_creds = load_config(cls, path, CREDS)
    rotated = load_config(cls, path, ["data.s3.key=AKIAOTHERKEY", "data.s3.secret=other"])
    assert config_hash(with_creds) == config_hash(rotated) == config_hash(load_config(cls, path))
    # what the data is read from still counts
    assert config_hash(load_config(cls, path, ["data.s3.endpoint_url=http://other:9000"])) \
        != config_hash(with_creds)


@pytest.mark.parametrize("cls, path", _configs())
def test_written_config_omits_credentials_and_loads_back(cls, path, tmp_path):
    cfg = load_config(cls, path, CREDS)
    dump_config(cfg, tmp_path / "config.yaml")
    assert not _leaks(tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    assert "data.s3.secret (AWS_SECRET_ACCESS_KEY)" in text.splitlines()[0]  # says where
    again = load_config(cls, tmp_path / "config.yaml")
    assert (again.data.s3.key, again.data.s3.secret, again.data.s3.token) == (None, None, None)
    assert config_hash(again) == config_hash(cfg)  # resuming from it is the same run


def test_reprs_and_config_errors_never_show_credentials():
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, DEMO, CREDS)
    for text in (repr(cfg), str(cfg.data), repr(cfg.data.s3)):
        assert KEY not in text and SECRET not in text and TOKEN not in text
    assert "endpoint_url" in repr(cfg.data.s3)  # the rest is still shown
    # a numeric secret is read as a number by YAML: the error names the key, not the value
    with pytest.raises(ConfigError, match="data.s3.secret: expected") as err:
        load_config(PretrainConfig, DEMO, ["data.s3.secret=80417255390071"])
    assert "80417255390071" not in str(err.value)


def test_dry_runs_print_no_credentials(capsys):
    assert main(["pretrain", "--dry-run", "--gpus", "2", *CREDS]) == 0
    assert main(["finetune", "classification", "--dry-run", *CREDS]) == 0
    assert main(["submit", "--dry-run", "pretrain", "--output-dir", "/tmp/x", *CREDS]) == 0
    out = capsys.readouterr()
    assert "data.s3.secret=null" in out.out  # what every task of the job runs
    for value in (KEY, SECRET, TOKEN):
        assert value not in out.out and value not in out.err


@pytest.mark.slow
def test_pretrain_run_writes_no_credentials(tmp_path, cache):
    """A real run (1 step, a checkpoint): config, metrics, trainer state, DeepSpeed files,
    logs; the checkpoint's config hash is that of the same config without credentials.
    (A fine-tuning run writes its config through the same ``dump_config``, tested above;
    its metrics and ``last.pt`` hold no config.)"""
    out = tmp_path / "run"
    proc = run_forked(pretrain_cmd(1, out, "--max-steps", "1", "--checkpoint-every", "1",
                                   *CREDS), cache)
    assert (out / "checkpoints" / "latest").is_file()
    assert not _leaks(out)
    for value in (KEY, SECRET, TOKEN):
        assert value not in proc.stdout and value not in proc.stderr
    state = json.loads((out / "checkpoints" / "step_0000001" / "trainer_state.json").read_text())
    from pretrain.config import PretrainConfig

    written = load_config(PretrainConfig, out / "config.yaml")  # the run's config, sans secrets
    assert state["config_hash"] == config_hash(written)


def _fake_slurm(bin_dir: Path, env_file: Path) -> None:
    """`sbatch` that records the environment it was given and answers as SLURM does
    ("Submitted batch job N", the line submitit parses); `srun` only has to exist."""
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\nenv > '{env_file}'\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for p in bin_dir.iterdir():
        p.chmod(p.stat().st_mode | stat.S_IEXEC)


def test_submitted_job_gets_credentials_through_the_environment(tmp_path, monkeypatch):
    """submitit pickles the job (its command line included) into the job folder: the
    credentials travel as AWS_* variables of the sbatch call (exported to the job) instead."""
    for name in AWS_ENV:  # set first so that monkeypatch restores them after `submit`
        monkeypatch.setenv(name, "unset")
    env_file = tmp_path / "sbatch_env.txt"
    _fake_slurm(tmp_path / "bin", env_file)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin")
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    assert main(["submit", "--folder", str(logs), "pretrain", "--output-dir", str(run_dir),
                 *CREDS]) == 0
    pickles = list(logs.rglob("*.pkl"))
    assert pickles and all(b"data.s3.secret=null" in p.read_bytes() for p in pickles)
    assert list(logs.rglob("*.sh"))  # the sbatch script
    assert not _leaks(logs) and not (run_dir.exists() and _leaks(run_dir))
    given = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert {k: given.get(k) for k in AWS_ENV} == AWS_ENV


# Credentials a shard URL may carry, as users write them in pipe: commands (curl's -u/--user
# and -H, an inline token variable): the leaked values must appear nowhere, the rest stays.
PIPE_SECRETS = ("hunter2", "hf_EXAMPLEtoken", "sk_EXAMPLEtoken")


def _pipe(command: str) -> str:
    """``pipe:`` URL running ``command``, with credentials in arguments a shell ignores."""
    return (f"pipe:{command}; : -u alice:hunter2 --user=alice:hunter2 "
            f"-H 'Authorization: Bearer hf_EXAMPLEtoken' HF_TOKEN=sk_EXAMPLEtoken")


def test_redact_url_hides_command_line_credentials():
    from runtime.redact import redact_url

    cases = {
        "pipe:curl -u alice:hunter2 https://h/x.tar": "pipe:curl -u *** https://h/x.tar",
        "pipe:curl -s --user alice:hunter2 https://h/x.tar": "pipe:curl -s --user *** https://h/x.tar",
        "pipe:curl --user 'alice:hunter2 x' https://h/x.tar": "pipe:curl --user *** https://h/x.tar",
        'pipe:curl -H "Authorization: Bearer hf_EXAMPLEtoken" -L https://h/x.tar':
            'pipe:curl -H "Authorization:***" -L https://h/x.tar',
        "pipe:wget --header=Authorization:hf_EXAMPLEtoken -O - https://h/x.tar":
            "pipe:wget --header=Authorization:*** -O - https://h/x.tar",
        "pipe:HF_TOKEN=sk_EXAMPLEtoken curl https://h/x.tar": "pipe:HF_TOKEN=*** curl https://h/x.tar",
        "HTTP 401 (Authorization: Bearer hf_EXAMPLEtoken)": "HTTP 401 (Authorization: ***)",
        "s3://AKIA:hunter2@bucket/x.tar": "s3://***@bucket/x.tar",
        # nothing to hide: unchanged
        "pipe:curl -sL https://h/shards/{000..009}.tar": "pipe:curl -sL https://h/shards/{000..009}.tar",
        "s3://laion-400m/x-user/00001.tar": "s3://laion-400m/x-user/00001.tar",
    }
    assert {url: redact_url(url) for url in cases} == cases


def _cls_shard(path: Path, labels: list[bytes]) -> Path:
    import io
    import tarfile

    from s3_server import jpeg_bytes

    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            for ext, data in (("jpg", jpeg_bytes(i, 8)), ("cls", label)):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_classification_data_never_logs_or_raises_url_credentials(tmp_path, caplog):
    from finetune.cls_data import ShardDataset
    from finetune.cls_stream import StreamingShards

    shard = _cls_shard(tmp_path / "s.tar", [b"0", b"not a label", b"1", b"0"])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    good, bad = _pipe(f"cat {shard}"), _pipe(f"cat {junk}")
    messages = []
    with caplog.at_level("WARNING"):
        ds = ShardDataset([good], lambda img: img)  # skips (and reports) the bad label
        assert len(ds) == 3
        with pytest.raises(ValueError) as no_samples:
            ShardDataset([bad], lambda img: img)
        messages.append(str(no_samples.value))
        def stream(url: str) -> StreamingShards:
            return StreamingShards([url], lambda img: torch.zeros(1), num_samples=2,
                                   batch_size=2, shuffle_buffer=1, rank=0, world=1)

        _, labels = next(stream(good).batches())  # the unlabelled sample skipped
        assert sorted(labels.tolist()) == [0, 1]
        with pytest.raises(RuntimeError) as ended:
            next(stream(bad).batches())
        messages.append(str(ended.value))
    messages += [r.getMessage() for r in caplog.records]
    assert "skipped sample" in caplog.text and "unreadable" in messages[1]
    leaks = [m for m in messages if any(s in m for s in PIPE_SECRETS)]
    assert not leaks


# AWS Signature Version 4 query-string authentication (AWS S3 API reference,
# "Authenticating Requests: Using Query Parameters"): X-Amz-Credential and X-Amz-Signature
PRESIGNED = ("https://bucket.s3.amazonaws.com/shards/000001.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLE%2F20261203%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Expires=604800&X-Amz-Signature=f00dEXAMPLEsig")


def test_has_credential_tells_a_value_from_a_variable_that_names_one():
    from runtime.redact import has_credential

    held = ["pipe:curl -u alice:hunter2 https://h/x.tar",
            'pipe:curl -H "Authorization: Bearer hf_EXAMPLEtoken" -L https://h/x.tar',
            "pipe:wget --header=X-Api-Key:k_EXAMPLE -O - https://h/x.tar",
            "pipe:HF_TOKEN=sk_EXAMPLEtoken curl https://h/x.tar",
            "s3://AKIA:hunter2@bucket/x.tar", PRESIGNED,
            # a GCS V4 signed URL (Google Cloud Storage docs, "V4 signing process":
            # X-Goog-Credential, X-Goog-Signature), an OAuth token, an API key
            "https://storage.googleapis.com/b/x.tar?X-Goog-Algorithm=GOOG4-RSA-SHA256"
            "&X-Goog-Credential=sa%40p.iam.gserviceaccount.com&X-Goog-Signature=8f3a9c",
            "https://h/x.tar?access_token=ya29.EXAMPLE", "https://h/x.tar?api_key=k_EXAMPLE"]
    # a value the shell expands when the command runs is never written; headers and
    # options that are no credential (Accept:, --user-agent) are not one
    not_held = ['pipe:curl -H "Authorization: Bearer $HF_TOKEN" -L https://h/{0..9}.tar',
                "pipe:curl -u ${USER_NAME}:${USER_PASSWORD} https://h/x.tar",
                "pipe:curl -H 'Accept: application/x-tar' --user-agent 'me/1.0' https://h/x",
                "pipe:aws s3 cp s3://bucket/x-user/{0..3}.tar -",
                "s3://laion-400m/{000000..041407}.tar", "/data/shards/list.txt",
                # options named like credentials that take none: rclone reading them
                # from the environment, gsutil's requester-pays project, curl choosing
                # its auth method, files and key ids
                "pipe:rclone cat --s3-env-auth remote:bucket/laion-{00000..00099}.tar",
                "pipe:gsutil -u my-billing-project cat gs://bucket/x.tar",
                "pipe:curl --anyauth -u $U:$P https://h/x.tar",
                "pipe:s5cmd --credentials-file ~/.aws/credentials cat s3://b/x.tar",
                "pipe:curl --key /etc/ssl/client.key --cert /etc/ssl/c.pem https://h/x",
                "pipe:aws s3 cp --sse-kms-key-id alias/mykey s3://b/x.tar -"]
    assert [u for u in held if not has_credential(u)] == []
    assert [u for u in not_held if has_credential(u)] == []


@pytest.mark.parametrize("command, override", [
    ("pretrain", f"data.sources=[{{name: laion, urls: '{PRESIGNED}'}}]"),
    # beside an entry that names no shard: that refusal quotes the URLs (it came first)
    ("pretrain", f"data.sources=[{{name: laion, urls: ['{PRESIGNED}', '']}}]"),
    ("pretrain", "zero_shot.urls=['pipe:curl -u alice:hunter2 https://h/{0..3}.tar']"),
    ("finetune classification", "data.train_urls=['pipe:HF_TOKEN=sk_EXAMPLEtoken curl "
                                "https://h/{0..3}.tar']"),
])
def test_a_url_holding_a_credential_is_a_config_error_that_does_not_show_it(
        command, override, capsys):
    """A config's URLs reach the run's config.yaml and a submitted job's command line
    (only the credential fields are left out there): a credential inside one is refused
    before anything runs, named by its key, the value not shown."""
    args = [*command.split(), "--dry-run", override]
    if command != "pretrain":
        args += ["data.kind=shards", "data.val_urls=[/nowhere/val.tar]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    key = override.split("=", 1)[0]
    assert "config error" in err and "holds a credential" in err and "$VAR" in err, err
    assert (key if key != "data.sources" else "sources.laion.urls") in err, err
    assert not any(s in err for s in (*PIPE_SECRETS, "f00dEXAMPLEsig", "AKIAEXAMPLE")), err


def test_a_pipe_command_reading_its_token_from_the_environment_is_accepted(capsys):
    url = 'pipe:curl -sL -H "Authorization: Bearer $HF_TOKEN" https://h/{000..009}.tar'
    assert main(["pretrain", "--dry-run", f"data.sources=[{{name: hf, urls: '{url}'}}]"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"][0]["name"] == "hf"
