-- Every rejected input with its reason: those the workers rejected (staged_rejects:
-- undecodable, missing_file, http_error, ...) and those sql/curate.sql rejected
-- (filters, duplicates). Together with the accepted rows they account for every input.
SELECT ordinal, source_uri, reason, detail, caption, orig_width, orig_height, id
FROM staged_rejects
UNION ALL
SELECT
    s.ordinal,
    s.source_uri,
    d.reason,
    d.detail,
    left(s.caption, 200) AS caption,
    s.orig_width,
    s.orig_height,
    s.id
FROM staged AS s
JOIN decisions AS d ON d.ordinal = s.ordinal
WHERE d.reason IS NOT NULL
ORDER BY ordinal
