"""``python -m transcriber``: run the job named by WHISPER_JOB_ID, as the Job's container does."""

import sys

from transcriber.job import main

sys.exit(main())
