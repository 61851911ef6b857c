-- Dataset statistics for the manifest, after sql/curate.sql.
-- One row per figure: (section, key, value, sort); `sort` orders keys within a section.
--   counts                    train, val, rejects
--   rejects_by_reason         reason -> count
--   caption_chars             min, mean, max over accepted rows
--   caption_chars_histogram   power-of-two buckets ("0", "1-1", "2-3", "4-7", ...) -> count
--   orig_min_side_histogram   shorter original side, power-of-two buckets -> count
--   top_orig_sizes            the 10 most common original "WxH" -> count
WITH accepted AS (
    SELECT s.caption_chars, s.orig_width, s.orig_height, d.split
    FROM staged AS s
    JOIN decisions AS d ON d.ordinal = s.ordinal
    WHERE d.reason IS NULL
),
all_rejects AS (
    SELECT reason FROM staged_rejects
    UNION ALL
    SELECT reason FROM decisions WHERE reason IS NOT NULL
),
bucketed AS (
    SELECT
        caption_chars,
        CASE WHEN caption_chars = 0 THEN 0 ELSE 1 << floor(log2(caption_chars))::INTEGER END AS caption_lo,
        1 << floor(log2(greatest(least(orig_width, orig_height), 1)))::INTEGER AS side_lo,
        format('{}x{}', orig_width, orig_height) AS size
    FROM accepted
),
sizes AS (
    SELECT size, count(*) AS n, row_number() OVER (ORDER BY count(*) DESC, size) AS rank
    FROM bucketed
    GROUP BY size
)
SELECT 'counts' AS section, split AS key, count(*)::DOUBLE AS value, 0 AS sort FROM accepted GROUP BY split
UNION ALL
SELECT 'counts', 'rejects', count(*)::DOUBLE, 0 FROM all_rejects
UNION ALL
SELECT 'rejects_by_reason', reason, count(*)::DOUBLE, 0 FROM all_rejects GROUP BY reason
UNION ALL
SELECT 'caption_chars', 'min', min(caption_chars)::DOUBLE, 0 FROM accepted HAVING count(*) > 0
UNION ALL
SELECT 'caption_chars', 'mean', avg(caption_chars)::DOUBLE, 1 FROM accepted HAVING count(*) > 0
UNION ALL
SELECT 'caption_chars', 'max', max(caption_chars)::DOUBLE, 2 FROM accepted HAVING count(*) > 0
UNION ALL
SELECT
    'caption_chars_histogram',
    CASE WHEN caption_lo = 0 THEN '0' ELSE format('{}-{}', caption_lo, 2 * caption_lo - 1) END,
    count(*)::DOUBLE,
    caption_lo
FROM bucketed
GROUP BY caption_lo
UNION ALL
SELECT 'orig_min_side_histogram', format('{}-{}', side_lo, 2 * side_lo - 1), count(*)::DOUBLE, side_lo
FROM bucketed
GROUP BY side_lo
UNION ALL
SELECT 'top_orig_sizes', size, n::DOUBLE, rank FROM sizes WHERE rank <= 10
