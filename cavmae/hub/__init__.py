"""Released checkpoints: the registry of named weight tags, the local cache and downloads.

Torch-free and numpy-free (plain stdlib), so the runtime can fetch and locate models where
PyTorch is absent; only verifying a downloaded checkpoint imports torch, lazily.

- :mod:`cavmae.hub.cache`: where the cache lives (``$CAVMAE_HOME``);
- :mod:`cavmae.hub.registry`: the named checkpoints, their label sets and mirrors;
- :mod:`cavmae.hub.download`: resumable, verified, atomic downloads.

The core never imports ``cavmae.runtime``, ``cavmae.export`` or ``cavmae.cli``; neither does
this package.
"""
