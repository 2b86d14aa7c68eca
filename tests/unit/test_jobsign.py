"""Job seals: each kind of forgery refused by the verifier and the worker's admission, the seen-set
surviving a restart, the orchestrator's key file, and the join code."""

from __future__ import annotations

import base64
import copy
import stat
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from farm import jobsign
from farm.join import JoinCode, JoinError, read_env_file, write_env_file
from farm.jobsign import JobRefused
from farm.settings import Settings
from orchestrator import keys
from orchestrator.planning import plan
from orchestrator.sweep import SweepSpec
from worker.admission import Admission, AdmissionError, SeenJobs, jobs_public_key

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc)
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def job_json() -> dict:
    job = plan(SweepSpec(name="seal", models=["smollm2-135m"], n_prompt=[16], n_gen=[4], repetitions=1))[0]
    return job.model_dump(mode="json")


def sealed(job_json, key=KEY, expires_at=NOW + timedelta(hours=1), worker=""):
    return job_json, jobsign.seal(job_json, key, expires_at, worker)


def refusal(job_json, seal, now=NOW, worker="w1") -> str:
    with pytest.raises(JobRefused) as exc:
        jobsign.verify(job_json, seal, KEY.public_key(), worker, now)
    return exc.value.code


def test_an_honest_seal_verifies_and_names_its_job(job_json):
    checked = jobsign.verify(*sealed(job_json), KEY.public_key(), "w1", NOW)
    assert checked.job_id == job_json["job_id"]
    assert checked.expires_at == NOW + timedelta(hours=1)
    # Over the wire the JSON is decoded again: the same values, a new dict, still valid.
    assert jobsign.verify(copy.deepcopy(job_json), sealed(job_json)[1], KEY.public_key(), "w1", NOW)


@pytest.mark.parametrize("seal", [None, {}, "a signature", {"v": 1, "signature": "x"}])
def test_a_job_without_a_seal_is_unsigned(job_json, seal):
    assert refusal(job_json, seal) == "unsigned"


def test_a_job_signed_with_another_key_is_refused_as_such(job_json):
    assert refusal(*sealed(job_json, key=OTHER)) == "other_key"


def test_a_job_signed_with_another_key_claiming_ours_is_tampered(job_json):
    job, seal = sealed(job_json, key=OTHER)
    seal["key_id"] = jobsign.key_id(KEY.public_key())
    assert refusal(job, seal) == "tampered"


@pytest.mark.parametrize("change", [
    lambda job, seal: job.update(model="/home/victim/.ssh/id_rsa"),
    lambda job, seal: job.update(repetitions=job["repetitions"] + 1),
    lambda job, seal: job["config"].update(n_threads=64),
    lambda job, seal: job.update(extra_field=1),
    lambda job, seal: seal.update(expires_at=(NOW + timedelta(days=365)).isoformat()),
    lambda job, seal: seal.update(nonce="0" * 32),
    lambda job, seal: seal.update(worker="somebody-else"),
    lambda job, seal: seal.update(signature=base64.b64encode(b"\0" * 64).decode()),
    lambda job, seal: seal.update(signature="not base64!"),
])
def test_any_change_after_signing_is_tampering(job_json, change):
    job, seal = sealed(copy.deepcopy(job_json))
    change(job, seal)
    assert refusal(job, seal) == "tampered"


def test_an_expired_job_is_refused_and_one_still_valid_is_not(job_json):
    job, seal = sealed(job_json, expires_at=NOW)
    assert refusal(job, seal, now=NOW) == "expired"
    assert jobsign.verify(job, seal, KEY.public_key(), "w1", NOW - timedelta(seconds=1))


def test_a_job_addressed_to_another_worker_is_refused(job_json):
    job, seal = sealed(job_json, worker="w2")
    assert refusal(job, seal, worker="w1") == "misaddressed"
    assert jobsign.verify(job, seal, KEY.public_key(), "w2", NOW)


def test_a_second_delivery_of_the_same_seal_is_a_replay_even_after_a_restart(tmp_path, job_json):
    path = tmp_path / "seen.jsonl"
    gate = Admission(KEY.public_key(), "w1", SeenJobs(path))
    job, seal = sealed(job_json, expires_at=datetime.now(timezone.utc) + timedelta(hours=1))
    assert gate.admit(job, seal).job_id == job["job_id"]
    with pytest.raises(JobRefused) as exc:
        gate.admit(job, seal)
    assert exc.value.code == "replayed"
    restarted = Admission(KEY.public_key(), "w1", SeenJobs(path))
    with pytest.raises(JobRefused) as exc:
        restarted.admit(job, seal)
    assert exc.value.code == "replayed"
    # The orchestrator sending the job again (its worker died) makes a new seal: that one runs.
    assert restarted.admit(*sealed(job, expires_at=datetime.now(timezone.utc) + timedelta(hours=1)))


def test_a_forged_job_is_not_remembered_so_it_cannot_block_the_genuine_one(tmp_path, job_json):
    gate = Admission(KEY.public_key(), "w1", SeenJobs(tmp_path / "seen.jsonl"))
    job, seal = sealed(job_json, expires_at=datetime.now(timezone.utc) + timedelta(hours=1))
    forged = dict(seal, signature=base64.b64encode(OTHER.sign(b"x")).decode())
    with pytest.raises(JobRefused):
        gate.admit(job, forged)
    assert len(gate.seen) == 0
    assert gate.admit(job, seal)


def test_a_signed_job_that_is_not_a_valid_job_is_malformed(tmp_path, job_json):
    gate = Admission(KEY.public_key(), "w1", SeenJobs(None))
    job = dict(job_json, kind="pp", n_prompt=0)
    with pytest.raises(JobRefused) as exc:
        gate.admit(*sealed(job, expires_at=datetime.now(timezone.utc) + timedelta(hours=1)))
    assert exc.value.code == "malformed"


def test_the_seen_set_forgets_expired_seals_and_stays_bounded(tmp_path):
    path = tmp_path / "seen.jsonl"
    seen = SeenJobs(path, max_entries=10)
    now = datetime.now(timezone.utc)
    seen.add(("old", "n"), now - timedelta(seconds=1))
    for i in range(30):
        seen.add((f"job{i}", "n"), now + timedelta(hours=1, seconds=i))
    assert len(seen) == 10
    assert ("job29", "n") in seen and ("job0", "n") not in seen  # the soonest to expire go first
    reloaded = SeenJobs(path, max_entries=10)
    assert len(reloaded) == 10 and ("old", "n") not in reloaded and ("job29", "n") in reloaded
    assert len(path.read_text().splitlines()) == 10  # compacted on load


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path):
    path = tmp_path / "seen.jsonl"
    seen = SeenJobs(path)
    seen.add(("a", "n"), datetime.now(timezone.utc) + timedelta(hours=1))
    with path.open("a") as f:
        f.write('{"job_id": "b", "non')
    assert ("a", "n") in SeenJobs(path)


def test_public_keys_read_as_base64_or_pem_and_junk_is_named():
    public = KEY.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for text in (jobsign.public_key_text(public), pem, "  " + pem + "\n"):
        assert jobsign.key_id(jobsign.load_public_key(text)) == jobsign.key_id(public)
    for junk, words in (("not a key!", "neither base64 nor PEM"), (base64.b64encode(b"x" * 31).decode(), "31 bytes"),
                        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "PEM")):
        with pytest.raises(ValueError, match=words):
            jobsign.load_public_key(junk)


def test_a_worker_without_a_public_key_cannot_start(tmp_path):
    with pytest.raises(AdmissionError, match="TOKENFARM_JOBS_PUBLIC_KEY"):
        jobs_public_key(Settings(data_dir=tmp_path))
    with pytest.raises(AdmissionError, match="TOKENFARM_JOBS_PUBLIC_KEY: the jobs public key is neither"):
        jobs_public_key(Settings(data_dir=tmp_path, jobs_public_key="???"))


def test_the_signing_key_is_made_once_private_and_shared_with_a_worker_on_the_same_box(tmp_path):
    first = keys.signing_key(tmp_path)
    keys._cache.clear()  # as another process would: read from the file
    again = keys.signing_key(tmp_path)
    assert jobsign.key_id(first.public_key()) == jobsign.key_id(again.public_key())
    private = tmp_path / "keys" / keys.PRIVATE_NAME
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    # A worker sharing the data dir (the embedded demo) trusts the public half beside it.
    worker_key = jobs_public_key(Settings(data_dir=tmp_path))
    assert jobsign.key_id(worker_key) == jobsign.key_id(first.public_key())
    # Two processes making the key at once: the second finds the first's and keeps it.
    assert keys._write_new(private, b"another key", 0o600) is False
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_sealed_job_expires_after_its_countdown_queue_allowance_and_time_limit(tmp_path):
    settings = Settings(data_dir=tmp_path, job_queue_allowance_s=600, job_timeout_s=60)
    assert keys.expires_at(settings, countdown_s=8, sent_at=NOW) == NOW + timedelta(seconds=668)


def test_a_join_code_carries_the_settings_and_refuses_junk_with_the_fix(tmp_path):
    code = JoinCode(name="box", broker_url="redis://:pw@farm.example:6379/0", worker_token="t" * 64,
                    jobs_public_key=jobsign.public_key_text(KEY.public_key()))
    text = code.encode()
    assert text.startswith("tfjoin1.") and " " not in text
    assert JoinCode.decode(text) == code
    assert JoinCode.decode(text).env()["TOKENFARM_BROKER_URL"] == "redis://:pw@farm.example:6379/0"
    own_user = code.model_copy(update={"broker_username": "tf-box", "broker_password": "p@ss"})
    assert own_user.env()["TOKENFARM_BROKER_URL"] == "redis://tf-box:p%40ss@farm.example:6379/0"
    for junk in ("hello", "tfjoin1.!!!", text[:-12], "tfjoin1." + base64.urlsafe_b64encode(b'{"name": "x"}').decode()):
        with pytest.raises(JoinError, match="workers add NAME"):
            JoinCode.decode(junk)
    path = tmp_path / "w" / "box.env"
    write_env_file(path, code.env())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_env_file(path) == code.env()
