import signal
import sys

from mnist_cnn.cli import main

code = main()
# Past this point the work is done and the run ended: a late Ctrl-C or SIGTERM must not turn the
# exit status into 130/143 while the interpreter shuts down.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.exit(code)
