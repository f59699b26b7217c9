"""The classic command names: ``vzctl``, ``vzlist``, ``vzdump``, ``vzrestore`` and
``vzmigrate`` command lines translated into ``vzbackup`` ones (``syntax``), and the opt-in
wrappers that put those names on a node without shadowing real ones (``wrappers``)."""
