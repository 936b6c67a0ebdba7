"""Hugging Face hub ids, checked before anything loads: one probe, then a one-line answer.

Left alone, transformers and datasets answer an unreachable hub with a minute of retry warnings
and then an error with no hint, and a gated model (the default, Llama 3.2) with an error that does
not say what to do. `ensure_hub_repo` asks the hub once, without retries (one HEAD request for a
model's config.json or a dataset's README.md) and:

- the hub answers and grants access: nothing to say, the libraries download as usual;
- the hub cannot be reached (no network, a firewall, DNS) and the repository is in the local cache:
  the process goes offline (`go_offline`, what HF_HUB_OFFLINE=1 does) and loads the cached copy,
  instead of retrying every file;
- not in the cache and unreachable, HF_HUB_OFFLINE=1 and not cached, gated, or not found: a
  `SlackdistError` naming the id, what went wrong and the ways forward.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from huggingface_hub import constants, get_hf_file_metadata, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from slackdist.errors import SlackdistError, first_line
from slackdist.offline import OFFLINE

logger = logging.getLogger(__name__)

RepoType = Literal["model", "dataset"]
PROBE_TIMEOUT_S = 10.0
"""How long the one probe waits for the hub (huggingface_hub's own metadata timeout)."""
OFFLINE_HINT = "HF_HUB_OFFLINE=1 loads only what is already in the local cache, without trying the network"


def looks_like_a_path(name: str) -> bool:
    """A name meant as a path, not a hub id: ./x, ../x, /x, ~/x, x\\y, or more than one slash."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def endpoint_host() -> str:
    """The hub's host name (huggingface.co, or the HF_ENDPOINT mirror)."""
    return urlparse(constants.ENDPOINT).netloc or constants.ENDPOINT


def is_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, or `go_offline` ran."""
    return constants.is_offline_mode()


def go_offline() -> None:
    """Make this process load from the local cache only, as HF_HUB_OFFLINE=1 at start would.

    huggingface_hub and datasets read HF_HUB_OFFLINE once, at import; afterwards they consult these
    module attributes (transformers asks huggingface_hub), so both are set, and the variable for any
    library imported later and for child processes.
    """
    os.environ[OFFLINE] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True


def in_cache(repo_id: str, repo_type: RepoType) -> bool:
    """Whether the local cache holds the repository: a model's config.json, any file of a dataset
    (the hub cache) or a dataset that `datasets` converted earlier (its own cache)."""
    if repo_type == "model":
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    snapshots = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    from datasets import config as datasets_config  # imported by the data layer anyway

    converted = Path(datasets_config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return converted.is_dir()


def _probe_url(repo_id: str, repo_type: RepoType) -> str:
    """The file the probe asks for: a model's config.json, a dataset's README.md (a missing file in a
    readable repository is an answer too), on the hub the process points at now (HF_ENDPOINT)."""
    folder, name = ("", "config.json") if repo_type == "model" else ("datasets/", "README.md")
    return f"{constants.ENDPOINT}/{folder}{repo_id}/resolve/main/{name}"


@functools.cache
def _probe(url: str) -> str | None:
    """Ask the hub once, without retries: None when it grants access, else why not ("gated", "missing",
    or the network error's first line). Any other HTTP answer counts as reachable: the loader reports it."""
    try:
        get_hf_file_metadata(url, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        return "gated"
    except RepositoryNotFoundError:
        return "missing"
    except HfHubHTTPError:  # e.g. a dataset without README.md: the repository answered
        return None
    except Exception as e:  # httpx's connection and timeout errors, OSError: the hub cannot be reached
        return f"unreachable: {first_line(e)}"
    return None


def ensure_hub_repo(
    repo_id: str, repo_type: RepoType, *, local_hint: str, subject: str | None = None
) -> None:
    """Make sure `repo_id` can load: from the hub, or from the local cache when the hub cannot be reached.

    Args:
        repo_id: a hub id such as "meta-llama/Llama-3.2-3B-Instruct".
        repo_type: "model" or "dataset".
        local_hint: how to use a local copy instead, e.g. "pass --model DIR (a local model folder)".
        subject: what the error lines start with (default: "REPO_ID:").

    Raises:
        SlackdistError: offline and not cached, unreachable and not cached, gated without access, or
            no such repository; one line with what to do.
    """
    what = "model" if repo_type == "model" else "dataset"
    subject = subject or f"{repo_id}:"
    page = f"{constants.ENDPOINT}/{'' if repo_type == 'model' else 'datasets/'}{repo_id}"
    cached = in_cache(repo_id, repo_type)
    if is_offline():
        if cached:
            return
        raise SlackdistError(
            f"{subject} not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
            f"forbids downloading it; {local_hint}, or unset HF_HUB_OFFLINE on a machine with network access"
        )
    problem = _probe(_probe_url(repo_id, repo_type))
    if problem is None:
        return
    if problem == "gated":
        raise SlackdistError(
            f"{subject} a gated {what}: accept its licence at {page} with your Hugging Face account, then set "
            f"HF_TOKEN to a read token of that account (or run `hf auth login`); or {local_hint}"
        )
    if problem == "missing":
        raise SlackdistError(
            f"{subject} no {what} of that name on {endpoint_host()} that this machine may read (a private "
            f"or gated one needs HF_TOKEN set to a token with access); {local_hint}"
        )
    if cached:
        logger.warning(
            "%s cannot be reached (%s); loading %s from the local cache, as with HF_HUB_OFFLINE=1",
            endpoint_host(),
            problem.removeprefix("unreachable: "),
            repo_id,
        )
        go_offline()
        return
    raise SlackdistError(
        f"{subject} not in the local Hugging Face cache and {endpoint_host()} cannot be reached "
        f"({problem.removeprefix('unreachable: ')}); {local_hint}, or connect and retry (a gated {what} such as "
        f"Llama also needs its licence accepted at {page} and HF_TOKEN set); {OFFLINE_HINT}"
    )
