"""Hub id + revision -> verified local files (through huggingface_hub), and the Pythia suite's names and steps.

`fetch("EleutherAI/pythia-160m", "step1000")` asks the Hub once for the revision's commit and the sha256 of every
file (`model_info(files_metadata=True)`), downloads only what conversion needs into the Hugging Face cache, hashes each
file and refuses one whose hash differs from the Hub's (the bad blob is removed from the cache, so a retry downloads it
again). The hashes are recorded (`$NEOX_JAX_CACHE/hub/ORG--NAME.json`) so that offline (`HF_HUB_OFFLINE=1`) the cached
files are verified against what the Hub said at download time.

The Hugging Face settings are read when called, not when huggingface_hub was imported: HF_HOME / HF_HUB_CACHE,
HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from neox_jax.errors import NeoXError

PYTHIA_SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class HubError(NeoXError):
    """A hub id / revision that cannot be fetched or verified: names the repo, revision and file."""


class UnknownRepoError(HubError):
    """The Hub has no such repository (or it is private and no token was given)."""


def pythia_steps() -> list[int]:
    """The 154 published Pythia checkpoint steps: 0, 1, 2, 4, ..., 512 (log-spaced), then every 1000 to 143000."""
    return [0, *(2**i for i in range(10)), *range(1000, 143001, 1000)]


def pythia_model_ids() -> list[str]:
    """The Pythia suite (each size plain and `-deduped`) and GPT-NeoX-20B, as hub ids."""
    ids = [f"EleutherAI/pythia-{s}{d}" for s in PYTHIA_SIZES for d in ("", "-deduped")]
    return [*ids, "EleutherAI/gpt-neox-20b"]


def is_pythia(repo_id: str) -> bool:
    return repo_id.lower().startswith("eleutherai/pythia-")


def step_of(revision: str | None) -> int | None:
    """ "step1000" -> 1000; anything else (main, a commit sha) -> None."""
    m = re.fullmatch(r"step(\d+)", revision or "")
    return int(m.group(1)) if m else None


def nearest_steps(step: int) -> list[int]:
    """The published steps just below and just above `step` (one of them at either end)."""
    steps = pythia_steps()
    i = bisect.bisect_left(steps, step)
    return steps[max(i - 1, 0) : i + 1]


def is_hub_id(source: str | os.PathLike) -> bool:
    """True for `org/name` that is not an existing local path (a local directory always wins)."""
    s = str(source)
    return not Path(s).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not s.startswith(".")


@dataclass(frozen=True)
class Settings:
    """The huggingface_hub configuration in force now (environment read at call time)."""

    endpoint: str
    cache_dir: Path
    token: str | None
    offline: bool
    records: Path  # where neox-jax keeps the hashes it verified

    @classmethod
    def from_env(cls) -> Settings:
        from huggingface_hub import constants

        env = os.environ
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
        offline = (
            (env["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE"))
            if "HF_HUB_OFFLINE" in env
            else bool(constants.HF_HUB_OFFLINE)
        )
        return cls(
            endpoint=(env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
            cache_dir=Path(os.path.expanduser(os.path.expandvars(cache))),
            token=env.get("HF_TOKEN") or None,
            offline=offline,
            records=neox_cache_dir() / "hub",
        )


def neox_cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("NEOX_JAX_CACHE") or "~/.cache/neox-jax"))


@dataclass
class Resolved:
    """A revision resolved to its commit, with the hashes the Hub gives (or gave, when recorded) for its files:
    expected[name] = {"sha256": ... (LFS files), "git_sha1": ... (git blob id), "size": ...}."""

    repo_id: str
    revision: str
    commit: str
    expected: dict[str, dict] = field(default_factory=dict)
    offline: bool = False

    def weight_files(self) -> list[str]:
        return sorted(f for f in self.expected if f.endswith(WEIGHT_SUFFIXES))

    def fingerprint(self) -> str | None:
        """One hash of the weight files' sha256s (None when the Hub gave none): equal weights, equal fingerprint."""
        shas = [self.expected[f].get("sha256") for f in self.weight_files()]
        if not shas or None in shas:
            return None
        return hashlib.sha256("\n".join(sorted(shas)).encode()).hexdigest()


@dataclass
class HubFiles:
    """Verified local files of one revision: `path` is the snapshot directory conversion reads."""

    resolved: Resolved
    path: Path
    sha256: dict[str, str]

    def source_record(self) -> dict:
        r = self.resolved
        return {
            "repo_id": r.repo_id,
            "revision": r.revision,
            "commit": r.commit,
            "sha256": dict(sorted(self.sha256.items())),
        }


def _repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _pick_files(names: set[str]) -> list[str]:
    """What conversion reads: config, one kind of weights (safetensors preferred) with its index, the tokenizer."""
    st = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    bins = sorted(n for n in names if re.fullmatch(r"pytorch_model.*\.bin", n))
    weights = (
        (st + [n for n in ("model.safetensors.index.json",) if n in names])
        if st
        else (bins + [n for n in ("pytorch_model.bin.index.json",) if n in names])
    )
    return ["config.json", *weights, *[n for n in TOKENIZER_FILES if n in names]]


def _translate(e: Exception, repo_id: str, revision: str, s: Settings) -> HubError | None:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        return HubError(
            f"{repo_id} is gated: accept its terms on {s.endpoint}/{repo_id} and set HF_TOKEN to a token "
            f"of that account"
        )
    if isinstance(e, RepositoryNotFoundError):
        hint = "" if s.token else "; if it is private, set HF_TOKEN"
        pythia = f" (the Pythia suite: {', '.join(pythia_model_ids()[:4])}, ...)" if is_pythia(repo_id) else ""
        return UnknownRepoError(f"unknown repo {repo_id} on {s.endpoint}{hint}{pythia}")
    if isinstance(e, RevisionNotFoundError):
        step = step_of(revision)
        if is_pythia(repo_id) and step is not None:
            near = ", ".join(f"step{n}" for n in nearest_steps(step))
            return HubError(f"{repo_id} has no revision {revision!r}; nearest published steps: {near}")
        if is_pythia(repo_id):
            return HubError(
                f"{repo_id} has no revision {revision!r}; Pythia revisions are step0, step1, step2, step4 "
                f"... step512, step1000 ... step143000 (neox_jax.store.hub.pythia_steps()) or main"
            )
        return HubError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit sha)")
    return None


def _network_errors() -> tuple[type, ...]:
    """The Hub out of reach, whichever HTTP client this huggingface_hub version uses."""
    import importlib

    errs: list[type] = [ConnectionError, TimeoutError]
    for mod, names in (
        ("httpx2", ("ConnectError", "TimeoutException")),
        ("httpx", ("ConnectError", "TimeoutException")),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        errs += [getattr(m, n) for n in names if isinstance(getattr(m, n, None), type)]
    return tuple(errs)


def _offline_error(repo_id: str, revision: str, s: Settings, why: str) -> HubError:
    return HubError(
        f"{why}, and {repo_id}@{revision} is not in the Hugging Face cache {s.cache_dir}: run once online "
        f"(or set HF_HUB_CACHE to the cache that has it)"
    )


# ---------------------------------------------------------------------------------------------- the hash records
def _record_file(s: Settings, repo_id: str) -> Path:
    return s.records / (repo_id.replace("/", "--") + ".json")


def _read_record(s: Settings, repo_id: str) -> dict:
    f = _record_file(s, repo_id)
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return {"refs": {}, "commits": {}}


def _write_record(s: Settings, r: Resolved) -> None:
    rec = _read_record(s, r.repo_id)
    rec.setdefault("refs", {})[r.revision] = r.commit
    rec.setdefault("commits", {})[r.commit] = r.expected
    f = _record_file(s, r.repo_id)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f"{f.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    tmp.replace(f)


# ---------------------------------------------------------------------------------------------- resolve
def resolve(repo_id: str, revision: str | None = None, settings: Settings | None = None) -> Resolved:
    """One request (model_info with file metadata): the commit and the Hub's hashes. Offline (or the Hub out of
    reach): from the hashes recorded at download time, else from the cache's refs and blob names."""
    from huggingface_hub import HfApi

    s, revision = settings or Settings.from_env(), revision or "main"
    if s.offline:
        return _resolve_cached(repo_id, revision, s, "offline (HF_HUB_OFFLINE=1)")
    try:
        info = HfApi(endpoint=s.endpoint, token=s.token).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # translated below, or re-raised
        err = _translate(e, repo_id, revision, s)
        if err is not None:
            raise err from None
        if isinstance(e, _network_errors()):
            return _resolve_cached(repo_id, revision, s, f"cannot reach {s.endpoint} ({type(e).__name__})")
        raise
    cfg = info.config or {}
    if cfg.get("model_type") not in (None, "gpt_neox"):
        raise HubError(
            f"{repo_id}@{revision} is a {cfg['model_type']!r} model, not GPT-NeoX (model_type 'gpt_neox'); "
            f"neox-jax converts GPTNeoXForCausalLM checkpoints only"
        )
    expected = {}
    for sib in info.siblings or []:
        e = {"size": sib.size, "git_sha1": sib.blob_id}
        if sib.lfs is not None:
            e.update(sha256=sib.lfs.sha256, size=sib.lfs.size)
        expected[sib.rfilename] = e
    if "config.json" not in expected:
        raise HubError(f"{repo_id}@{revision} has no config.json; not a transformers checkpoint")
    wanted = _pick_files(set(expected))
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in wanted):
        raise HubError(f"{repo_id}@{revision}: no model*.safetensors or pytorch_model*.bin weights in the repo")
    return Resolved(repo_id, revision, info.sha, {f: expected[f] for f in wanted})


def recorded_commit(repo_id: str, revision: str, settings: Settings | None = None) -> str | None:
    """The commit `revision` resolved to when last downloaded (None if never), with no network."""
    s = settings or Settings.from_env()
    return _read_record(s, repo_id).get("refs", {}).get(revision)


def _resolve_cached(repo_id: str, revision: str, s: Settings, why: str) -> Resolved:
    rec = _read_record(s, repo_id)
    folder = _repo_folder(s.cache_dir, repo_id)
    commit = rec.get("refs", {}).get(revision)
    if commit is None and (folder / "refs" / revision).is_file():  # a cache filled by another tool
        commit = (folder / "refs" / revision).read_text().strip()
    if commit is None and COMMIT_RE.match(revision):
        commit = revision
    snap = folder / "snapshots" / (commit or "-")
    if commit is None or not (snap / "config.json").is_file():
        raise _offline_error(repo_id, revision, s, why)
    expected = rec.get("commits", {}).get(commit)
    if expected is None:  # no record: the blob names are the hashes the Hub sent (sha256 for LFS, git sha1 else)
        expected = {}
        for f in _pick_files({p.name for p in snap.iterdir()}):
            blob = os.path.basename(os.path.realpath(snap / f))
            expected[f] = (
                {"sha256": blob}
                if re.fullmatch(r"[0-9a-f]{64}", blob)
                else {"git_sha1": blob}
                if COMMIT_RE.match(blob)
                else {}
            )
    missing = [f for f in expected if not (snap / f).is_file()]
    if missing:
        raise _offline_error(repo_id, revision, s, f"{why} (files missing from the cache: {missing})")
    return Resolved(repo_id, revision, commit, expected, offline=True)


# ---------------------------------------------------------------------------------------------- download + verify
def _hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, read once."""
    sha, git = hashlib.sha256(), hashlib.sha1()
    git.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            sha.update(chunk)
            git.update(chunk)
    return sha.hexdigest(), git.hexdigest()


def _verify(r: Resolved, name: str, path: Path) -> str:
    """Returns the file's sha256; on a mismatch removes the blob (and its snapshot link) and raises."""
    sha, git = _hashes(path)
    want = r.expected.get(name, {})
    bad = None
    if want.get("sha256") and sha != want["sha256"]:
        bad = f"sha256 {sha}, the Hub's is {want['sha256']}"
    elif not want.get("sha256") and want.get("git_sha1") and git != want["git_sha1"]:
        bad = f"git blob sha1 {git}, the Hub's is {want['git_sha1']}"
    elif name.endswith(WEIGHT_SUFFIXES) and not want.get("sha256") and not want.get("git_sha1"):
        raise HubError(
            f"{r.repo_id}@{r.revision} ({r.commit[:12]}): {name}: no hash recorded to verify it against "
            f"(sha256 {sha}); run once online so the Hub's hashes are recorded"
        )  # not proven bad: kept
    if bad is None:
        return sha
    blob = Path(os.path.realpath(path))
    for p in {blob, path}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    raise HubError(
        f"{r.repo_id}@{r.revision} ({r.commit[:12]}): {name}: {bad}; refused, and removed the corrupt "
        f"copy from the cache ({blob}): run again to download it again"
    )


def download(r: Resolved, settings: Settings | None = None) -> HubFiles:
    """Downloads (or finds in the cache) every expected file of the resolved commit and verifies each."""
    from huggingface_hub import hf_hub_download

    s = settings or Settings.from_env()
    paths: dict[str, Path] = {}
    sha256: dict[str, str] = {}
    for name in sorted(r.expected, key=lambda n: (n != "config.json", n)):  # config first: refuse non-NeoX early
        if r.offline:
            paths[name] = _repo_folder(s.cache_dir, r.repo_id) / "snapshots" / r.commit / name
        else:
            try:
                paths[name] = Path(
                    hf_hub_download(
                        r.repo_id, name, revision=r.commit, cache_dir=s.cache_dir, endpoint=s.endpoint, token=s.token
                    )
                )
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    size = r.expected[name].get("size")
                    raise HubError(
                        f"disk full while downloading {r.repo_id}@{r.revision} {name} ({size} bytes) into "
                        f"{s.cache_dir}: free space, or set HF_HUB_CACHE to a larger disk"
                    ) from None
                err = _translate(e, r.repo_id, r.revision, s)
                if err is not None:
                    raise err from None
                raise
        sha256[name] = _verify(r, name, paths[name])  # each file as it arrives: a bad one stops the rest
        if name == "config.json":
            _check_neox(r, paths[name])
    if not r.offline:
        _write_record(s, r)
    return HubFiles(r, paths["config.json"].parent, sha256)


def _check_neox(r: Resolved, config: Path) -> None:
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{r.repo_id}@{r.revision}: config.json unreadable ({e})") from None
    if model_type != "gpt_neox":
        raise HubError(
            f"{r.repo_id}@{r.revision} is a {model_type!r} model, not GPT-NeoX (model_type 'gpt_neox'); "
            f"neox-jax converts GPTNeoXForCausalLM checkpoints only"
        )


def fetch(repo_id: str, revision: str | None = None) -> HubFiles:
    """Hub id + revision -> verified local files (the snapshot directory in the Hugging Face cache)."""
    s = Settings.from_env()
    return download(resolve(repo_id, revision, s), s)
