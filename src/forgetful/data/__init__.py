"""Data: text corpora and windows from files, folders or the Hub (:mod:`~forgetful.data.sources`),
the embedded generator of fictitious authors (:mod:`~forgetful.data.embedded`), and the TOFU
splits with their one prompt/answer encoding (:mod:`~forgetful.data.tofu`)."""
