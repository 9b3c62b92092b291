"""Where a backbone's published weights are found: the caches users already keep, and a download only when
allowed (`backbone.download`).

Resolution order, for a backbone whose weights the user did not name (`backbone.weights`):

1. the Hugging Face hub cache (`HF_HOME`, `HF_HUB_CACHE`), laid out as the hub lays it out, where timm and
   open_clip keep what they download; for weights published only at a URL, the torch hub cache
   (`TORCH_HOME`);
2. a download, when `backbone.download` is true, by `huggingface_hub` (which honours `HF_HUB_OFFLINE`,
   `HF_ENDPOINT` and `HF_TOKEN`) or `torch.hub`;
3. else one error naming where it looked and what to set.
"""

from __future__ import annotations

import os
import posixpath

from adaptflow.errors import AdaptflowError

# the files a timm repository on the hub publishes its weights in, preferred first
HF_FILES = ("model.safetensors", "pytorch_model.bin")
FIX = (
    "set backbone.weights to a weights file (--set backbone.weights=PATH), allow a download on a machine "
    "that is online (--set backbone.download=true), or use --set backbone.weights=random"
)


def hf_weights(repo_id: str, name: str, download: bool, files: tuple[str, ...] = HF_FILES) -> str:
    """The local path of `repo_id`'s weights on the Hugging Face hub (the first of `files` it has): from
    the cache, else downloaded when `download` is true; an AdaptflowError naming the cache and the fix
    otherwise."""
    from huggingface_hub import constants, try_to_load_from_cache

    for filename in files:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found
    if download:
        return _hf_download(repo_id, name, files)
    raise AdaptflowError(
        f"backbone {name!r}: weights of {repo_id} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and downloads are off. To fix: {FIX}."
    )


def _hf_download(repo_id: str, name: str, files: tuple[str, ...]) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        for filename in files:
            try:
                return hf_hub_download(repo_id, filename)
            except RemoteEntryNotFoundError:  # not this file: try the next (offline is LocalEntryNotFound)
                continue
    except Exception as e:  # offline, no such repository, no access: the hub's own words say which
        why = str(e).splitlines()[0].rstrip(".")
        raise AdaptflowError(
            f"backbone {name!r}: could not download the weights of {repo_id}: {why}. To fix: {FIX}."
        ) from None
    raise AdaptflowError(f"backbone {name!r}: {repo_id} publishes none of {', '.join(files)}. To fix: {FIX}.")


def url_weights(url: str, name: str, download: bool) -> str:
    """The local path of weights published at `url`, in the torch hub cache (where torchvision keeps them):
    downloaded there when `download` is true; an AdaptflowError naming the path and the fix otherwise."""
    import torch

    path = os.path.join(torch.hub.get_dir(), "checkpoints", posixpath.basename(url))
    if os.path.exists(path):
        return path
    if download:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=False)
        except Exception as e:
            why = str(e).splitlines()[0].rstrip(".")
            raise AdaptflowError(f"backbone {name!r}: could not download {url}: {why}. To fix: {FIX}.") from None
        return path
    raise AdaptflowError(
        f"backbone {name!r}: weights not found at {path} (the torch hub cache) and downloads are off. "
        f"To fix: copy {url} there, or {FIX}."
    )
