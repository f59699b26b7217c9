"""Storage backends for the backup repository: a tiny put/get/list/delete interface.

``storage.backend.Backend`` is the interface, ``storage.registry`` maps a storage type
("dir", later "s3") to its implementation, ``storage.config`` reads named storages.
"""
