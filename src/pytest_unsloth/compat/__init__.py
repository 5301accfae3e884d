"""What the installed stack is and whether it fits together, read without importing it.

``distributions`` reads installed versions and declared pins from metadata, ``constraints``
turns them into a per-package report and a pip constraints file, ``windows`` reads supported
version ranges kept in installed source, ``shadow`` finds stray modules hiding a package,
``archs`` reads which GPU architectures compiled extensions carry code for, and
``known_bad.json`` lists the combinations known to break at run time.
"""
