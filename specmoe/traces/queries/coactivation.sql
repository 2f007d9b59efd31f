-- Co-activation of two MoE layers: for each pair (expert at layer_a, expert at layer_b), the
-- number of (token, choice at a, choice at b) triples, i.e. how often a token that used
-- expert_a at layer_a used expert_b at layer_b. A token adds top x top pairs: with the
-- default top = k every choice counts; top = 1 keeps each token's first choice (the
-- highest gate weight). Dropped tokens (-1) are left out.
--
-- Variables: store; stack (default 'decoder'; Switch Transformers also has 'encoder');
-- layer_a (default 0); layer_b (default layer_a + 1); top (default k).
--   DuckDB shell:  SET VARIABLE store = 'runs/traces'; SET VARIABLE layer_a = 2;  .read coactivation.sql
--   specmoe:       specmoe traces query runs/traces coactivation --set layer_a=2 --set top=1
-- Columns: expert_a, expert_b, tokens.

WITH settings AS (
    SELECT model.top_k AS k,
           coalesce(getvariable('stack'), 'decoder') AS stack,
           coalesce(getvariable('layer_a'), 0) AS layer_a,
           coalesce(getvariable('layer_b'), coalesce(getvariable('layer_a'), 0) + 1) AS layer_b,
           coalesce(getvariable('top'), model.top_k) AS top
    FROM read_json(getvariable('store') || '/manifest.json')
),
routing AS (
    UNPIVOT (SELECT COLUMNS('\.expert_ids$') FROM read_parquet(getvariable('store') || '/shard-*.parquet'))
    ON COLUMNS(*) INTO NAME stack VALUE expert_ids
),
layers AS (
    SELECT expert_ids[layer_a * k + 1 : layer_a * k + top] AS at_a,
           expert_ids[layer_b * k + 1 : layer_b * k + top] AS at_b
    FROM routing, settings
    WHERE routing.stack = settings.stack || '.expert_ids'
)
SELECT a.expert AS expert_a, b.expert AS expert_b, count(*) AS tokens
FROM layers, unnest(layers.at_a) AS a(expert), unnest(layers.at_b) AS b(expert)
WHERE a.expert >= 0 AND b.expert >= 0
GROUP BY ALL
ORDER BY ALL;
