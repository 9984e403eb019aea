"""A corpus indexed once, asked many questions (``if-query index``; ``run-query --index``): each window's whitened
gradient sketched per tracked module (:mod:`~if_query.index.sketch`), rows on disk (:mod:`~if_query.index.store`),
built in one frozen-weight pass per window (:mod:`~if_query.index.build`); a query set shortlists candidates by
products with the rows and scores them exactly with the engine (:mod:`~if_query.index.answer`). See docs/index.md."""
