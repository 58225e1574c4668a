<?php
// A minimal webhook receiver that verifies X-Webhook-Signature with the guide's PHP snippet.
//
//   WEBHOOK_SECRET=whsec_... php -S 127.0.0.1:9000 receiver.php
//
// 204 when the signature verifies, 401 otherwise. PHP's standard library only.

$secret = getenv('WEBHOOK_SECRET') ?: '';
if ($secret === '' || $_SERVER['REQUEST_METHOD'] !== 'POST') {
    http_response_code($secret === '' ? 500 : 405);
    exit($secret === '' ? 'set WEBHOOK_SECRET' : 'POST only');
}

$payload = file_get_contents('php://input');
$signature = $_SERVER['HTTP_X_WEBHOOK_SIGNATURE'] ?? '';
$expected = hash_hmac('sha256', $payload, $secret);

if (! hash_equals($expected, $signature)) {
    error_log('rejected a delivery with a bad signature');
    http_response_code(401);
    exit('Invalid signature');
}

$event = json_decode($payload, true);
error_log(sprintf(
    'verified delivery %s: %s %s',
    $_SERVER['HTTP_X_WEBHOOK_DELIVERY'] ?? '?',
    $event['event'],
    json_encode($event['data'])
));
http_response_code(204);
