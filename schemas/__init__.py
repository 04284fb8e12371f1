"""Every wire shape of the Firehose protocol and of our own errors, as marshmallow schemas."""
