#!/usr/bin/env python
"""The evaluation harness, as a script: the same command as ``mmprefix eval`` (`mmprefix.experiment.evaluate`)."""

import sys

from mmprefix.experiment.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
