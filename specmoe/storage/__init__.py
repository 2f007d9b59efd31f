"""Safe file handling shared by every command that writes or reads project data.

- :mod:`~specmoe.storage.paths`: names that become paths, containment, guarded deletion.
- :mod:`~specmoe.storage.atomic`: write-then-rename with fsync of the file and its directory.
- :mod:`~specmoe.storage.integrity`: SHA-256 checks of what is read, with a verified-marker
  fast path, and range checks of decoded values.
- :mod:`~specmoe.storage.locks`: one writer per output directory (OS locks that a killed
  process cannot leave behind), shareable by the ranks of one ``torchrun`` job.
- :mod:`~specmoe.storage.scratch`: the project's own temporary directory, cleaned on exit,
  on Ctrl-C and on the next start after a kill.

See docs/guarantees.md for what these promise to users.
"""
