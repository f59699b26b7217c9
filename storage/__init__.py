"""Storage backends for the backup repository: a tiny put/get/list/delete interface.

``storage.backend.Backend`` is the interface; ``storage.registry`` maps a storage type
("dir", "s3") to its options dataclass (``storage.options``, ``storage.s3options``) and its
implementation (``storage.local``, ``storage.s3``). This package imports nothing else of vzbackup:
``vzbackup.config.storage`` reads storage.cfg into the options.
"""
