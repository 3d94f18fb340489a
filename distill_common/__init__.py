"""Small utilities shared by every stage: typed config loading, logging, atomic files,
progress lines and the offline asset cache. Nothing here imports training code."""
