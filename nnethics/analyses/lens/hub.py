"""``--tuned-lens hub:ORG/REPO[/subfolder][@revision]``: a pretrained tuned lens from the Hugging Face hub.

A lens folder on the hub, in the tuned-lens package's format (``config.json`` + ``params.pt``, as its
``TunedLens.save`` writes them) or nnethics' (``params.safetensors``), is fetched through huggingface_hub's cache
(``hf_hub_download``; ``HF_HUB_CACHE``), so an NDIF user needs no local training: the lens runs here on the
residuals nnsight brings back. Without network (``HF_HUB_OFFLINE=1``, or the hub unreachable) the cache alone
answers (``local_files_only``). Non-model repos are named as in ``HfFileSystem`` paths: the tuned-lens
package's own lenses are ``hub:spaces/AlignmentResearch/tuned-lens/lens/<model>``.
"""

from __future__ import annotations

from pathlib import Path

from .hub_spec import SYNTAX, split_hub_spec
from .lenses import CONFIG, PARAMS, TL_PARAMS, LensLoadError


def parse_hub_spec(spec: str) -> tuple[str, str, str | None, str | None]:
    """``hub:[spaces/]ORG/REPO[/subfolder][@revision]`` -> (repo_id, repo_type, subfolder, revision)."""
    parsed = split_hub_spec(spec)
    if parsed is None:
        raise LensLoadError(f"--tuned-lens {spec}: {SYNTAX}")
    return parsed

def _download(spec: str, filename: str, local_only: bool) -> Path | None:
    """One file of the lens folder from the hub cache (downloading it unless ``local_only``); None if absent."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, repo_type, subfolder, revision = parse_hub_spec(spec)
    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, repo_type=repo_type, revision=revision,
                                    local_files_only=local_only))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None

def hub_lens_folder(spec: str) -> Path:
    """The local snapshot folder holding the lens named by ``spec`` (``config.json`` + parameters).

    Asks the hub first (unless offline) and falls back on the cache when the hub cannot be reached; raises
    :class:`~nnethics.analyses.lens.lenses.LensLoadError` naming the flag and the fix when neither has it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    parse_hub_spec(spec)  # a malformed spec fails before any look-up
    for local_only in ((True,) if constants.HF_HUB_OFFLINE else (False, True)):
        try:
            config = _download(spec, CONFIG, local_only)
            params = config and (_download(spec, PARAMS, local_only) or _download(spec, TL_PARAMS, local_only))
        except RepositoryNotFoundError:
            raise LensLoadError(f"--tuned-lens {spec}: no such repository on the hub (or it is private: set "
                                "HF_TOKEN); check ORG/REPO, and prefix spaces/ or datasets/ for those repos") from None
        except (OfflineModeIsEnabled, HfHubHTTPError, OSError):
            continue  # the hub is unreachable: the cache answers
        if config and params and config.parent == params.parent:
            return config.parent
    where = Path(constants.HF_HUB_CACHE)
    raise LensLoadError(f"--tuned-lens {spec}: no {CONFIG} with {TL_PARAMS} or {PARAMS} there, neither on the hub "
                        f"nor in the hub cache {where}; check the subfolder, or download it where the hub is reachable "
                        f"(`hf download ... --repo-type ...`) and set HF_HUB_CACHE")
