"""The training side of supervisord-ft.

``contract`` (torch-free) is what any training script needs to cooperate with the supervisor;
``checkpoint`` moves torch state in and out of checkpoint files, and ``async_checkpoint`` writes
it without stalling training; ``train`` is the built-in job, run as ``python -m supervisord_ft_worker``;
``startup`` (torch-free) times a rank's start-up phases.
"""
