"""The subcommands of ``specdec`` (specdec/cli.py is the entry point): the parser and its shared flags
(:mod:`.parser`), a preset overlaid with the flags given (:mod:`.settings`), and one module per command that
``specdec/cli.py`` runs itself (:mod:`.bench`, :mod:`.generate`, :mod:`.trigrams`, :mod:`.presets`). The commands
of other subpackages register their own parsers: ``models`` (specdec.models.cli), ``train`` and
``train-acceptance`` (specdec.training.cli), ``export-heads`` (specdec.drafters.heads.export), ``serve``
(specdec.serve.cli)."""
