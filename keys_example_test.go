package ech_test

import (
	"fmt"
	"log"
	"os"
	"time"

	"github.com/echkit/ech"
)

func ExampleGenerateKey() {
	key, err := ech.GenerateKey("public.example", &ech.KeyOptions{
		KEM:      ech.KEMX25519,
		ConfigID: 7,
	})
	if err != nil {
		log.Fatal(err)
	}
	config, err := ech.KeyConfig(key)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(config)
	fmt.Println(len(key.PrivateKey), "byte private key")
	// Output:
	// config_id=7 kem=DHKEM(X25519, HKDF-SHA256) suites=[HKDF-SHA256/AES-128-GCM HKDF-SHA256/AES-256-GCM HKDF-SHA256/ChaCha20-Poly1305] public_name="public.example" max_name_length=0 extensions=0
	// 32 byte private key
}

func ExampleParseConfigList() {
	// The ech value of an HTTPS record.
	list, err := ech.ParseConfigListBase64("AEn+DQBFKgAgACAosEw8LDQp3ySXkrrFF7wkM7XIV55h7uEdNf6M3RaOdwAMAAEAAQABAAIAAQADIA5wdWJsaWMuZXhhbXBsZQAA")
	if err != nil {
		log.Fatal(err)
	}
	configs, err := ech.ParseConfigList(list)
	if err != nil {
		log.Fatal(err)
	}
	for _, c := range configs {
		fmt.Println(c.ConfigID, c.KEM, c.PublicName, c.CipherSuites[0])
	}
	// Output:
	// 42 DHKEM(X25519, HKDF-SHA256) public.example HKDF-SHA256/AES-128-GCM
}

func ExampleConfigList_HTTPSRecord() {
	list, err := ech.ParseConfigListBase64("AEn+DQBFKgAgACAosEw8LDQp3ySXkrrFF7wkM7XIV55h7uEdNf6M3RaOdwAMAAEAAQABAAIAAQADIA5wdWJsaWMuZXhhbXBsZQAA")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(list.HTTPSRecord("example.com", time.Hour, "h2", "http/1.1"))
	// Output:
	// example.com. 3600 IN HTTPS 1 . alpn="h2,http/1.1" ech="AEn+DQBFKgAgACAosEw8LDQp3ySXkrrFF7wkM7XIV55h7uEdNf6M3RaOdwAMAAEAAQABAAIAAQADIA5wdWJsaWMuZXhhbXBsZQAA"
}

func ExampleParsePEM() {
	data, err := os.ReadFile("testdata/pem/openssl-echconfig.pem")
	if err != nil {
		log.Fatal(err)
	}
	f, err := ech.ParsePEM(data)
	if err != nil {
		log.Fatal(err)
	}
	key, err := f.Key()
	if err != nil {
		log.Fatal(err)
	}
	ks, err := ech.NewKeySet(key)
	if err != nil {
		log.Fatal(err)
	}
	list, err := ks.ConfigList()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ks.ConfigIDs(), list)
	// Output:
	// [231] AD7+DQA65wAgACA8wVN2BtscOl3vQheUzHeIkVmKIiydUhDCliA4iyQRCwAEAAEAAQALZXhhbXBsZS5jb20AAA==
}

func ExampleKeySet_Rotate() {
	old, err := ech.GenerateKey("public.example", &ech.KeyOptions{ConfigID: 1})
	if err != nil {
		log.Fatal(err)
	}
	ks, err := ech.NewKeySet(old)
	if err != nil {
		log.Fatal(err)
	}

	// Publish a new key; the old one decrypts for one more hour, the DNS
	// TTL of its HTTPS record plus client caching time.
	next, err := ech.GenerateKey("public.example", &ech.KeyOptions{AvoidConfigIDs: ks.ConfigIDs()})
	if err != nil {
		log.Fatal(err)
	}
	if err := ks.Rotate(time.Hour, next); err != nil {
		log.Fatal(err)
	}
	for _, k := range ks.Keys() {
		c, err := ech.KeyConfig(k)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(c.ConfigID == 1, k.SendAsRetry)
	}
	// Output:
	// false true
	// true false
}
