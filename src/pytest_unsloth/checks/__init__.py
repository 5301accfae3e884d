"""Environment checks: ``pytest --unsloth-env`` runs each as an ``unsloth-env::NAME`` item.

The model of a check (``Check``, ``CheckContext``, ``CheckFailed``, ``CheckSkipped``) is in
``base``; ``registry`` gathers them (the ``@pytest_unsloth.check`` decorator, the hooks declared
in ``hookspecs``, vetoes, ``unsloth_checks`` selection); ``collection`` turns them into the items
of ``items``, whose isolated ones run through ``isolated``; ``report`` writes the table and the
JSON report. The built-in checks live one module per group (``env``, ``cuda``, ``machine``,
``topology``, ``kernels``, ``nccl``, ``grpo``, ``fit``), gathered in run order by ``builtin``.
"""
