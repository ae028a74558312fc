"""Remote control: the pidbox mailbox node and the commands it answers (wire contract F)."""
