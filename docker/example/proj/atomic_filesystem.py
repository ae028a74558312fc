"""kombu's ``filesystem://`` transport, each message published atomically.

kombu's ``Channel._put`` creates the message file, then locks and writes it;
``Channel._get`` moves files out of the folder without the lock. A reader
polling at the instant between the two takes an empty file: the message is
gone and the worker logs a ``JSONDecodeError`` (seen in CI, a chain's second
step lost). Here a message is written under a name no reader matches and
renamed into place once complete (``os.replace`` is atomic), with kombu's
own file name, format and folder otherwise.
"""

import os
import time
import uuid

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        staged = os.path.join(self.data_folder_out, f".{name}.staged")
        with open(staged, "wb") as file:
            file.write(str_to_bytes(dumps(payload)))
        os.replace(staged, os.path.join(self.data_folder_out, name))


class Transport(filesystem.Transport):
    Channel = Channel
