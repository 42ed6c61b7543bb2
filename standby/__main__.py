"""``python -m standby REPLY_FD MODULE...``: one warm standby rank (see :mod:`standby.runner`)."""

from standby.runner import main

main()
