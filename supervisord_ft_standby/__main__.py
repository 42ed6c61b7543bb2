"""``python -m supervisord_ft_standby REPLY_FD MODULE...``: one warm standby rank (see :mod:`supervisord_ft_standby.runner`)."""

from supervisord_ft_standby.runner import main

main()
