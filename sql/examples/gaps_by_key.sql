-- Which keys lost the most events in the window?
SELECT key, count(*) AS gaps, sum(missing_count) AS missing
FROM gaps
GROUP BY key
ORDER BY missing DESC, key
LIMIT 20;
