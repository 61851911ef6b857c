-- The published rows of one split (variable `split`), after sql/curate.sql.
-- Ordered by id (a hash of the image: a fixed pseudo-random order that readers can
-- stream in row groups without a shuffle buffer), then by source order.
SELECT
    s.id,
    s.caption,
    s.image,
    s.width,
    s.height,
    s.orig_width,
    s.orig_height,
    s.orig_format,
    s.source_uri,
    s.meta
FROM staged AS s
JOIN decisions AS d ON d.ordinal = s.ordinal
WHERE d.reason IS NULL AND d.split = getvariable('split')
ORDER BY s.id, s.ordinal
