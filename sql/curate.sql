-- Curation of staged ingest rows: filters, exact dedupe, deterministic train/val split.
--
-- Reads:  view `staged` (one row per decoded input, schema ROW_SCHEMA in tasks/image_io.py).
-- Reads variables (SET VARIABLE, see tasks/ingest.py curation_variables):
--   min_size, max_aspect_ratio        on the original width/height
--   min_caption_chars, max_caption_chars, keep_empty_captions
--   dedupe                            'image' | 'image_caption' | 'none'
--   val_threshold                     8 lowercase hex digits
-- Writes: table `decisions` (ordinal, id, reason, detail, split): exactly one row per
--   staged row; reason is NULL for accepted rows, split is NULL for rejected ones.

-- 1. Filters, first failing rule wins. Only narrow columns: the image bytes stay on disk.
CREATE OR REPLACE TEMP TABLE filtered AS
SELECT
    ordinal,
    id,
    md5(caption) AS caption_md5,
    source_uri,
    CASE
        WHEN least(orig_width, orig_height) < getvariable('min_size') THEN 'too_small'
        WHEN greatest(orig_width, orig_height) > getvariable('max_aspect_ratio') * least(orig_width, orig_height)
            THEN 'bad_aspect'
        WHEN caption_chars = 0 AND NOT getvariable('keep_empty_captions') THEN 'empty_caption'
        WHEN caption_chars > 0 AND caption_chars < getvariable('min_caption_chars') THEN 'caption_too_short'
        WHEN caption_chars > getvariable('max_caption_chars') THEN 'caption_too_long'
    END AS reason,
    CASE
        WHEN least(orig_width, orig_height) < getvariable('min_size')
            THEN format('{}x{}: shorter side below min_size {}', orig_width, orig_height, getvariable('min_size'))
        WHEN greatest(orig_width, orig_height) > getvariable('max_aspect_ratio') * least(orig_width, orig_height)
            THEN format('{}x{}: aspect ratio above {}', orig_width, orig_height, getvariable('max_aspect_ratio'))
        WHEN caption_chars = 0 AND NOT getvariable('keep_empty_captions') THEN 'caption is empty after normalisation'
        WHEN caption_chars > 0 AND caption_chars < getvariable('min_caption_chars')
            THEN format('{} characters < min_caption_chars {}', caption_chars, getvariable('min_caption_chars'))
        WHEN caption_chars > getvariable('max_caption_chars')
            THEN format('{} characters > max_caption_chars {}', caption_chars, getvariable('max_caption_chars'))
    END AS detail
FROM staged;

-- 2. Exact dedupe among rows that passed the filters: the first input (lowest ordinal,
--    i.e. source order) of each group wins. 3. Split by the first 32 bits of md5(id):
--    md5 and string comparison are stable across DuckDB versions, unlike hash(); and a
--    split by image hash keeps copies of one image (dedupe 'image_caption') on one side.
CREATE OR REPLACE TABLE decisions AS
WITH ranked AS (
    SELECT
        ordinal,
        id,
        row_number() OVER dup AS rank_in_group,
        first_value(source_uri) OVER dup AS first_source
    FROM filtered
    WHERE reason IS NULL
    WINDOW dup AS (
        PARTITION BY id, CASE WHEN getvariable('dedupe') = 'image_caption' THEN caption_md5 END
        ORDER BY ordinal
    )
),
deduped AS (
    SELECT
        ordinal,
        id,
        CASE WHEN getvariable('dedupe') <> 'none' AND rank_in_group > 1 THEN 'duplicate' END AS reason,
        CASE WHEN getvariable('dedupe') <> 'none' AND rank_in_group > 1
            THEN format('same {} as {}',
                        CASE getvariable('dedupe') WHEN 'image' THEN 'image' ELSE 'image and caption' END,
                        first_source)
        END AS detail
    FROM ranked
)
SELECT
    ordinal,
    id,
    reason,
    detail,
    CASE
        WHEN reason IS NOT NULL THEN NULL
        WHEN left(md5(id), 8) < getvariable('val_threshold') THEN 'val'
        ELSE 'train'
    END AS split
FROM deduped
UNION ALL
SELECT ordinal, id, reason, detail, NULL AS split
FROM filtered
WHERE reason IS NOT NULL;
